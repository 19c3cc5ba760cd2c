"""Single-device GPT, BERT and Llama. Nothing here imports torch.distributed: parallelism is applied from outside."""

from __future__ import annotations

import torch
from torch import nn

from seqpar.config import ModelConfig
from seqpar.models.attention import CoreAttention, sdpa_attention, set_core_attention, set_sequence_projection
from seqpar.models.bert import BERT
from seqpar.models.gpt import GPT
from seqpar.models.llama import Llama

__all__ = ["BERT", "GPT", "MODELS", "Llama", "CoreAttention", "build_model", "sdpa_attention", "set_core_attention",
           "set_sequence_projection"]


MODELS: dict[str, type[nn.Module]] = {"gpt": GPT, "bert": BERT, "llama": Llama}  # model.arch -> the class (with its `layout`)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """Build the model for `cfg` on `device` ("meta" builds it without memory, for later sharding)."""
    cls = MODELS[cfg.arch]
    with torch.device(device):
        return cls(cfg)
