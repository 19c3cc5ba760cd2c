"""parallelize(): turn a single-device model built on the meta device into this rank's part, in one stated order.

1. sequence parallelism: swap the sp attention (`parallel.sp_impl`) into every attention layer over the sp group
   (Linformer models: the projection of keys and values, summed over the sp group, instead);
2. tensor parallelism: shard attention heads, the MLP and the vocabulary over the tp group with the plan the model
   declares (`tensor.py`), and with `parallel.tp_shard_activations` the LayerNorm/dropout regions by tokens;
3. tiled MLPs (`trainer.tiled_mlp`: each MLP a tile of tokens at a time, its intermediate never whole) and
   activation checkpointing (`trainer.activation_checkpointing`): each block recomputed in backward, its saved
   inputs in host memory with `offload`;
4. pipeline parallelism: cut into stages (`pipeline.py`), the model pruned to this rank's layers;
5. materialisation: allocate what the rank holds on its device and fill it from the whole tensors' values (the
   seeded initialisation `seqpar.models.layers.initial_value`, or a checkpoint's tensors), one parameter at a
   time, each rank keeping its shard;
6. data parallelism: a reducer that sums the gradients of what the rank holds over the `dp_sp` ranks
   (`data_parallel.py`).

Until step 5 the model lives on the meta device: no rank allocates the whole model on its device. The model is
changed in place and stays the one object to train, evaluate, optimise and save.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint

from seqpar.config import Config
from seqpar.models import set_core_attention, set_sequence_projection
from seqpar.models.layers import set_mlp_tiling
from seqpar.parallel.data_parallel import GradientReducer
from seqpar.parallel.mesh import ParallelMesh
from seqpar.parallel.pipeline import Pipeline
from seqpar.parallel.sequence import sequence_attention
from seqpar.parallel.sequence.linformer import SequenceParallelProjection
from seqpar.parallel.tensor import apply_tensor_parallel
from seqpar.torch_compat import checkpoint_wrapper

ValueOf = Callable[[str, tuple[int, ...]], torch.Tensor]  # (parameter name, whole shape) -> the whole value, on CPU


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: Config, value_of: ValueOf,
                pipeline_loss=None, loss_takes_features: bool = False) -> tuple[Pipeline | None, GradientReducer | None]:
    """Apply the layout to `model` (built on the meta device) and materialise it; returns this rank's pipeline
    (pp > 1, with `pipeline_loss` on its last stage: of the logits, or with `loss_takes_features` of the output
    layer's input) and gradient reducer (dp x sp > 1), else None for each."""
    if mesh.sp > 1 and cfg.model.attention == "linformer":  # projected keys summed over sp, local attention
        set_sequence_projection(model, SequenceParallelProjection(mesh.group("sp")))
    elif mesh.sp > 1:
        hybrid = cfg.parallel.sp_impl == "hybrid"
        group = mesh.group("sp_ulysses" if hybrid else "sp")
        set_core_attention(model, sequence_attention(cfg.parallel.sp_impl, group, mesh.group("sp_ring") if hybrid else None))
    if mesh.tp > 1:
        apply_tensor_parallel(model, mesh.device_mesh["tp"], cfg.model.attn_dropout,
                              shard_activations=cfg.parallel.tp_shard_activations)
    if cfg.trainer.tiled_mlp:  # by default hidden_size tokens a tile: its intermediate is then ~ffn x hidden
        t = cfg.trainer.tiled_mlp
        set_mlp_tiling(model, cfg.model.hidden_size if t is True else t)
    if cfg.trainer.activation_checkpointing:
        apply_activation_checkpointing(model, offload=cfg.trainer.activation_checkpointing == "offload")
    pipeline = None
    if mesh.pp > 1:
        p = cfg.parallel
        pipeline = Pipeline(model, mesh.local_rank("pp"), mesh.pp, mesh.group("pp"), p.pp_schedule, p.microbatches,
                            mesh.device, pipeline_loss, loss_takes_features)
    materialize(model, mesh.device, value_of)
    return pipeline, gradient_reducer(model, mesh)


def apply_activation_checkpointing(model: nn.Module, offload: bool = False) -> None:
    """Recompute each transformer block in backward instead of keeping its activations; with `offload`, the block
    inputs that the recomputation needs wait in host memory (`offloaded_checkpoint`)."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, offloaded_checkpoint if offload else None)


def offloaded_checkpoint(fn, *args, **kwargs):
    """Non-reentrant activation checkpointing whose saved inputs live in host memory until their backward.

    torch's checkpoint saves the block's tensor inputs (the hidden states, the padding mask) for the recomputation
    before it installs its own saved-tensor hooks, so a `save_on_cpu` context around it moves exactly those to the
    host (pinned, for an asynchronous copy, when a GPU is there), while what the recomputation saves stays under
    the checkpoint's hooks. Each input comes back to the device when its block's backward starts."""
    with save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def gradient_reducer(model: nn.Module, mesh: ParallelMesh) -> GradientReducer | None:
    """The dp x sp gradient sums of the parameters this rank holds (after pipeline pruning); None for one replica."""
    if mesh.dp * mesh.sp > 1:
        return GradientReducer(list(model.parameters()), mesh.group("dp_sp"))
    return None


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, value_of: ValueOf) -> None:
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
