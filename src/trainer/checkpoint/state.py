"""What a checkpoint holds, as stateful objects (`state_dict()` / `load_state_dict()`, torch DCP's `Stateful`): this
rank's model, AdamW's state and the learning-rate schedule, by global parameter name where there are tensors; each
rank's RNG state; and the run's counters (`TrainState`). The data loader (`GlobalBatchLoader`) is one already.

Tensor entries are saved through DCP, the others into meta.json (`manager.CheckpointManager`)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from seqpar.trainer.weights import state_by_name, unwrapped_name

# The names a checkpoint keeps each state under: its tensors' DCP keys start `<name>.` and its other entries are
# meta.json's field `<name>`, except TRAIN's, which stand at meta.json's top level (`step`, `bad_steps`,
# `skipped_steps`). Part of the on-disk format (FORMAT 1).
MODEL, OPTIM, SCHEDULER, LOADER, RNG, TRAIN = "model", "optim", "scheduler", "loader", "rng", "train"
ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


class ModelState:
    """This rank's parameters and buffers (tensor-parallel shards, its pipeline stages' layers) by global name
    (`weights.state_by_name`: without activation checkpointing's wrapper). Its tensors share the model's storage,
    so DCP loads into the model in place."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return state_by_name(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in state_by_name(self.model).items():
                if not _same_memory(state[name], tensor):  # not loaded in place (DCP loads in place)
                    tensor.copy_(state[name])


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = (t.to_local() if hasattr(t, "to_local") else t for t in (a, b))  # a DTensor's shard on this rank
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def param_names(model: nn.Module) -> dict[nn.Parameter, list[str]]:
    """Every parameter's global names (a tied parameter has several)."""
    names: dict[nn.Parameter, list[str]] = {}
    for k, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(unwrapped_name(k))
    return names


class OptimizerState:
    """AdamW's per-parameter state as `<parameter name>.{exp_avg,exp_avg_sq,step}`, so that it reshards like the
    parameter. A parameter no step has updated yet has zeros (also the template a load fills)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        self.optimizer, self.model = optimizer, model

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for p, names in param_names(self.model).items():
            state = self.optimizer.state.get(p, {})
            if not state:
                state = {"exp_avg": torch.zeros_like(p.data), "exp_avg_sq": torch.zeros_like(p.data),
                         "step": torch.zeros((), dtype=torch.float32)}
            for name in names:
                for key in ADAM_KEYS:
                    out[f"{name}.{key}"] = state[key]
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Hand the state to `Optimizer.load_state_dict`, which puts each tensor where torch keeps it: the moments
        on the parameter's device and dtype, and `step` on the parameter's device for the fused and capturable
        kernels (on CUDA they fail on a CPU step)."""
        names = param_names(self.model)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]  # state_dict()'s order
        per_param = {i: {k: state[f"{names[p][0]}.{k}"] for k in ADAM_KEYS} for i, p in enumerate(params)}
        self.optimizer.load_state_dict({"state": per_param,
                                        "param_groups": self.optimizer.state_dict()["param_groups"]})


class SchedulerState:
    """The learning-rate schedule's state without its functions (they are rebuilt from the config); a load also
    gives the optimizer's groups the restored rate."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}

    def load_state_dict(self, state: dict) -> None:
        groups = self.scheduler.optimizer.param_groups
        self.scheduler.load_state_dict(dict(state, lr_lambdas=[None] * len(groups)))
        for group, lr in zip(groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr


class RngState:
    """This rank's generators (`rank<r>.cpu`, `rank<r>.cuda`): its own dropout stream, so restored only into the
    same layout (`layout_bound`)."""

    layout_bound = True

    def __init__(self, rank: int, device: torch.device):
        self.rank, self.device = rank, device

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"rank{self.rank}.cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            out[f"rank{self.rank}.cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state[f"rank{self.rank}.cpu"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state[f"rank{self.rank}.cuda"], self.device)


@dataclasses.dataclass
class TrainState:
    """Where the run stands: optimizer steps done, non-finite steps in a row, and skipped steps in the whole run."""

    step: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.bad_steps, self.skipped_steps = state["step"], state["bad_steps"], state["skipped_steps"]



def training_states(model: nn.Module | None, optimizer: torch.optim.Optimizer, scheduler, loader, train: TrainState,
                    rank: int, device: torch.device) -> dict:
    """Everything a training checkpoint holds, by the name it keeps each under. `model` None: an engine that saves
    the model and the optimizer itself (DeepSpeed, the manager's `engine`)."""
    weights = {} if model is None else {MODEL: ModelState(model), OPTIM: OptimizerState(optimizer, model)}
    return {**weights, SCHEDULER: SchedulerState(scheduler), LOADER: loader, TRAIN: train,
            RNG: RngState(rank, device)}
