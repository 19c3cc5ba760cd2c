"""GPT with the GPT-2 architecture: learned positions, pre-LayerNorm blocks, GELU MLP, head tied to the embedding.

Single-device code. Positions are an input, so a chunk of a longer sequence knows where it sits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seqpar.config import ModelConfig
from seqpar.models.base import LanguageModel
from seqpar.models.dropout import KeyedDropout
from seqpar.models.gpt.hf import HF
from seqpar.models.layers import MLP, PreNormBlock, SelfAttention
from seqpar.models.layout import BLOCK_TP_PLAN, ParallelLayout


def gpt_block(cfg: ModelConfig, layer: int) -> PreNormBlock:
    """GPT-2's block: LayerNorms, multi-head attention with biases, the GELU MLP."""
    return PreNormBlock(cfg, layer, nn.LayerNorm, SelfAttention(cfg), MLP(cfg))


class GPT(LanguageModel):
    arch = "gpt"
    hf = (HF,)  # transformers interop (hf.py)
    layout = ParallelLayout(
        tp_plan={"wte": "vocab_embedding_to_tokens", **BLOCK_TP_PLAN, "ln_f": "token_norm",
                 "lm_head": "vocab_head_from_tokens"},
        token_sharded_outputs=("wpe",),
        tied={"lm_head.weight": "wte.weight"},
        embedding=("wte", "wpe"),
        head=("ln_f", "lm_head"),
        position_params=("wpe.weight",),
    )

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.drop = KeyedDropout(cfg.dropout, site=0)
        self.layers = nn.ModuleList(gpt_block(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.reset_parameters()

    def init_std(self, name: str) -> float:
        if name.endswith(("attn.o_proj.weight", "mlp.down.weight")):
            # GPT-2 scales the residual-branch output projections by 1/sqrt(2 * layers).
            return self.config.init_std / math.sqrt(2 * self.config.num_layers)
        return self.config.init_std

    # The three parts of forward, so a pipeline stage can run the ones it holds.
    def embed(self, input_ids, position_ids, token_type_ids=None, dropout_key=None) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return self.drop(self.wte(input_ids) + self.wpe(position_ids), dropout_key)

    def head_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> the output layer's input
        return self.ln_f(x)
