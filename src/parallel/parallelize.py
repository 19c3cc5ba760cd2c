"""parallelize(model, mesh, cfg): apply the layout to a single-device model, in one fixed order.

1. sequence parallelism: swap the sp attention (`parallel.sp_impl`) into every attention layer over the sp group;
2. data parallelism: wrap in DDP over the `dp_sp` ranks, gradients summed (see `data_parallel.py`).
Tensor and pipeline parallelism slot in between (tp before pp before dp) when they land.

The model itself is changed in place and stays the object to save, evaluate and optimise; the returned module is
the one to call in training (it is the model itself when there is nothing to wrap).
"""

from __future__ import annotations

from torch import nn

from seqpar.config import Config
from seqpar.models import set_core_attention
from seqpar.parallel.data_parallel import replicate
from seqpar.parallel.mesh import ParallelMesh
from seqpar.parallel.sequence import sequence_attention


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: Config) -> nn.Module:
    if mesh.sp > 1:
        set_core_attention(model, sequence_attention(cfg.parallel.sp_impl, mesh.group("sp")))
    if mesh.dp * mesh.sp > 1:
        return replicate(model, mesh.group("dp_sp"), mesh.device)
    return model
