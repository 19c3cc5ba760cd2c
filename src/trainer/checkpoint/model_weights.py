"""A checkpoint's model weights alone, in one process (for `seqpar.export`): DCP gathers every tensor-parallel
shard and pipeline stage into the whole model; a DeepSpeed checkpoint's weights come from ZeRO's files."""

from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn

from seqpar.trainer.checkpoint.files import deepspeed_files, storage_reader
from seqpar.trainer.checkpoint.ranks import single_process_quiet
from seqpar.trainer.checkpoint.state import MODEL, ModelState
from seqpar.trainer.engine import zero_fp32_state_dict
from seqpar.trainer.weights import unwrapped_name


def load_model_weights(path: Path, model: nn.Module, meta: dict, field_name: str = "checkpoint") -> None:
    """Only the model's weights from a checkpoint, in one process (for export). `meta` (from `read_meta`, its files
    checked with `verify_files`) says which engine wrote it: a `deepspeed/` folder alone never makes DeepSpeed read
    anything."""
    if meta.get("engine", {}).get("name") == "deepspeed":
        with deepspeed_files(path, field_name):
            state = zero_fp32_state_dict(str(path))
        model.load_state_dict({unwrapped_name(k): v for k, v in state.items()}, strict=False)
        return
    state = {f"{MODEL}.{k}": v for k, v in ModelState(model).state_dict().items()}
    with single_process_quiet():
        dcp.load(state, storage_reader=storage_reader(path), no_dist=True)
