"""parallelize(model, mesh, cfg): apply the layout to a single-device model, in one fixed order; materialize().

1. sequence parallelism: swap the sp attention (`parallel.sp_impl`) into every attention layer over the sp group
   (Linformer models: the projection of keys and values, summed over the sp group, instead);
2. tensor parallelism: shard attention heads, the MLP and the vocabulary over the tp group (`tensor.py`), and with
   `parallel.tp_shard_activations` the LayerNorm/dropout regions by tokens;
then the trainer cuts the pipeline stages (`pipeline.py`, which prunes the model to this rank's layers), and
3. data parallelism: a reducer that sums the gradients of what is left over the `dp_sp` ranks (`data_parallel.py`).

The model is built on the meta device and changed in place: no rank allocates the whole model on its device (with
`model.init_from` the checkpoint is read whole into host memory once). Once sharded and pruned, `materialize` allocates this rank's parameters on its device and fills them from the whole tensors'
values (the seeded initialisation `seqpar.models.layers.initial_value`, or a checkpoint's tensors), one parameter
at a time, each rank keeping its shard. The model stays the one object to train, evaluate, optimise and save.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from seqpar.config import Config
from seqpar.models import set_core_attention, set_sequence_projection
from seqpar.parallel.data_parallel import GradientReducer
from seqpar.parallel.mesh import ParallelMesh
from seqpar.parallel.sequence import sequence_attention
from seqpar.parallel.sequence.linformer import SequenceParallelProjection
from seqpar.parallel.tensor import apply_tensor_parallel


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: Config) -> None:
    """Sequence and tensor parallelism (on the meta device or a real one)."""
    if mesh.sp > 1 and cfg.model.attention == "linformer":  # projected keys summed over sp, local attention
        set_sequence_projection(model, SequenceParallelProjection(mesh.group("sp")))
    elif mesh.sp > 1:
        set_core_attention(model, sequence_attention(cfg.parallel.sp_impl, mesh.group("sp")))
    if mesh.tp > 1:
        apply_tensor_parallel(model, mesh.device_mesh["tp"], cfg.model.arch, cfg.model.attn_dropout,
                              shard_activations=cfg.parallel.tp_shard_activations)


def gradient_reducer(model: nn.Module, mesh: ParallelMesh) -> GradientReducer | None:
    """The dp x sp gradient sums of the parameters this rank holds (after pipeline pruning); None for one replica."""
    if mesh.dp * mesh.sp > 1:
        return GradientReducer(list(model.parameters()), mesh.group("dp_sp"))
    return None


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, value_of: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
    """Allocate a meta-built (sharded, pruned) model's parameters on `device` and fill each from `value_of(name,
    whole_shape)`, the whole tensor (on the CPU); a tensor-parallel parameter keeps its shard of it. Parameters keep
    their identity (tied weights stay tied, references to them stay valid)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # swap storage in place, keep the objects
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    for name, p in model.named_parameters():
        whole = value_of(name, tuple(p.shape))
        if isinstance(p, DTensor):  # every rank makes the whole value and keeps its shard: no communication
            p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local())
        else:
            p.copy_(whole)
