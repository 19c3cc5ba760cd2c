"""This rank's model and the whole model: `build_rank_model` builds the rank's part (meta device, parallelized,
then allocated and initialised), `gather_model` collects tensor-parallel shards and pipeline stages back into one
single-device model, and `state_by_name` names every tensor as one process would (without activation
checkpointing's wrapper), which is how checkpoints, exports and initial values address weights."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from seqpar.config import Config, ModelConfig
from seqpar.models import build_model
from seqpar.models.hf import from_pretrained
from seqpar.models.layers import initial_value
from seqpar.parallel.data_parallel import GradientReducer
from seqpar.parallel.mesh import ParallelMesh
from seqpar.parallel.parallelize import parallelize
from seqpar.parallel.pipeline import Pipeline
from seqpar.torch_compat import CHECKPOINT_WRAPPED

WRAPPER = f".{CHECKPOINT_WRAPPED}"  # activation checkpointing's wrapper, not part of a parameter's name


def unwrapped_name(name: str) -> str:
    """A parameter's name as one process without activation checkpointing has it."""
    return name.replace(WRAPPER, "")


def state_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (detached, sharing storage) by its global name, tied weights under each name."""
    return {unwrapped_name(k): v.detach() for k, v in model.state_dict(keep_vars=True).items()}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a tensor or a DTensor (gathered whole)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def initial_values(cfg: Config, model: nn.Module):
    """`value_of(name, shape)` for `materialize`: the seed's initial weights, or those of `model.init_from` (read
    once on the CPU). The same for every layout."""
    if not cfg.model.init_from:
        return lambda name, shape: initial_value(model, unwrapped_name(name), shape, cfg.trainer.seed)
    loaded, _ = from_pretrained(cfg.model.init_from)
    state = state_by_name(loaded)
    return lambda name, shape: state[unwrapped_name(name)]


def build_rank_model(cfg: Config, mesh: ParallelMesh, pipeline_loss=None, loss_takes_features: bool = False
                     ) -> tuple[nn.Module, Pipeline | None, GradientReducer | None]:
    """This rank's part of the model, its pipeline (pp > 1) and its gradient reducer (dp x sp > 1).

    Built on the meta device, given its sequence-parallel attention, sharded (tp), wrapped for activation
    checkpointing and pruned to this rank's pipeline stages, and only then allocated and initialised: no rank's
    device ever holds the whole model, and each holds the same weights as one process would
    (parallel/parallelize.py; `model.init_from` is read whole into host memory once)."""
    model = build_model(cfg.model, "meta")
    pipeline, reducer = parallelize(model, mesh, cfg, initial_values(cfg, model), pipeline_loss, loss_takes_features)
    return model, pipeline, reducer


def gather_model(model: nn.Module, model_cfg: ModelConfig, mesh: ParallelMesh) -> nn.Module:
    """The rank's part of a model (tensor-parallel shards, pipeline stages) gathered into a plain single-device
    model on the CPU. Every rank must call it; the result is complete on every rank of a pp group."""
    state = {k: full_tensor(v).cpu().clone() for k, v in state_by_name(model).items()}
    if mesh.pp > 1:
        parts = [None] * mesh.pp
        dist.all_gather_object(parts, state, group=mesh.group("pp"))
        state = {k: v for part in parts for k, v in part.items()}
    whole = build_model(model_cfg, "cpu")
    missing, unexpected = whole.load_state_dict(state, strict=False)
    tied = set(whole.layout.tied)  # the same tensor as the embedding's
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return whole
