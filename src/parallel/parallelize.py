"""parallelize(model, mesh, cfg): apply the layout to a single-device model, in one fixed order.

1. sequence parallelism: swap the sp attention (`parallel.sp_impl`) into every attention layer over the sp group
   (Linformer models: the projection of keys and values, summed over the sp group, instead);
2. tensor parallelism: shard attention heads, the MLP and the vocabulary over the tp group (`tensor.py`), and with
   `parallel.tp_shard_activations` the LayerNorm/dropout regions by tokens;
3. data parallelism: a reducer that sums gradients over the `dp_sp` ranks (`data_parallel.py`).

The model is changed in place and stays the one object to train, evaluate, optimise and save. Returns the
gradient reducer (None when there is one data replica).
"""

from __future__ import annotations

from torch import nn

from seqpar.config import Config
from seqpar.models import set_core_attention, set_sequence_projection
from seqpar.parallel.data_parallel import GradientReducer
from seqpar.parallel.mesh import ParallelMesh
from seqpar.parallel.sequence import sequence_attention
from seqpar.parallel.sequence.linformer import SequenceParallelProjection
from seqpar.parallel.tensor import apply_tensor_parallel


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: Config) -> GradientReducer | None:
    if mesh.sp > 1 and cfg.model.attention == "linformer":  # projected keys summed over sp, local attention
        set_sequence_projection(model, SequenceParallelProjection(mesh.group("sp")))
    elif mesh.sp > 1:
        set_core_attention(model, sequence_attention(cfg.parallel.sp_impl, mesh.group("sp")))
    if mesh.tp > 1:
        apply_tensor_parallel(model, mesh.device_mesh["tp"], cfg.model.arch, cfg.model.attn_dropout,
                              shard_activations=cfg.parallel.tp_shard_activations)
    if mesh.dp * mesh.sp > 1:
        return GradientReducer(list(model.parameters()), mesh.group("dp_sp"))
    return None
