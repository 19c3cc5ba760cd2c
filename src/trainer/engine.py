"""Engines: what turns the losses of a step's micro-batches into one optimizer update.

The trainer runs forward passes, hands each micro-batch's loss (already divided by the global batch's target
count) to `engine.backward`, then calls `engine.step(loss_is_finite)` once per optimizer step, which returns the
gradient norm before clipping and whether the update was applied. (A pipeline schedule runs backward itself, on
summed losses; the trainer then passes `grad_scale`, one over the target count.) Two engines fit behind that:

- `SeqparEngine` (`trainer.engine=seqpar`, the default): plain autograd, one sum of the gradients over the `dp_sp`
  ranks per step (`GradientReducer`), clipping by the global norm across tp and pp, torch AdamW with its whole
  state on every data-parallel rank. Works in every layout, pipeline schedules included.
- `DeepSpeedEngine` (`trainer.engine=deepspeed trainer.zero_stage=1|2|3`): DeepSpeed's ZeRO shards AdamW's state
  (stage 1), also the gradients (2) and the parameters (3) over the `dp_sp` group, which it gets from the mesh
  through an `mpu` object; sequence parallelism stays ours (the ring attention runs inside the model), so DeepSpeed
  sees dp x sp ranks that hold the same parameters, which is exactly a data-parallel group to it. Layouts with tp
  or pp > 1 are refused by the config check: our tensor parallelism uses DTensor parameters and our pipeline
  schedules run backward themselves, neither of which ZeRO's flat buffers and backward hooks can take.
  `trainer.offload_optimizer` adds ZeRO-Offload: Adam's moments and the fp32 partitions stay in host memory and
  the update runs there, with DeepSpeed's CPU Adam (`seqpar.trainer.optim.host_adamw`), which ZeRO-Offload requires.
  Under ZeRO-3 the fused output-layer loss runs as a call of the output layer (`seqpar.trainer.loss`), whose hooks
  gather its partitioned weight.

The same update in both: DeepSpeed *averages* gradients over its data-parallel group while our losses are already
normalised by the global target count (the right gradient is the *sum* over ranks), so the DeepSpeed engine
multiplies each loss by the group's size, and it asks DeepSpeed not to divide by the accumulation steps either.
Clipping agrees too (both scale by max_norm / (norm + 1e-6) when the norm exceeds max_norm), and so does skipping:
a non-finite gradient norm makes DeepSpeed drop the update, as ours does.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from seqpar.config import Config
from seqpar.parallel.data_parallel import GradientReducer, clip_grad_norm, match_grad_placements
from seqpar.parallel.mesh import ParallelMesh

# trainer.engine=deepspeed: DeepSpeed's own files inside a checkpoint directory, <checkpoint>/deepspeed/step/
# (the engine writes and reads them; the checkpoint modules checksum them and export reads the weights)
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "step"


class SeqparEngine:
    """Our own: autograd, one gradient all-reduce over dp_sp per step, global-norm clipping, torch AdamW."""

    name = "seqpar"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: ParallelMesh,
                 reducer: GradientReducer | None, pipeline, grad_clip: float):
        self.model, self.optimizer, self.mesh = model, optimizer, mesh
        self.reducer, self.pipeline, self.grad_clip = reducer, pipeline, grad_clip

    partitions_parameters = False

    def forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs)

    def gathered(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, loss_is_finite: bool, grad_scale: float | None = None) -> tuple[float, bool]:
        params = list(self.model.parameters())
        if grad_scale is not None:  # the pipeline's backward ran on summed losses
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(grad_scale)
        if self.mesh.tp > 1:
            match_grad_placements(params)
        if self.pipeline is not None:
            self.pipeline.sync_tied_grads()  # the embedding and head copies on the first and last stage
        if self.reducer is not None:
            self.reducer.reduce()  # sum over dp x sp, once per step
        grad_norm = clip_grad_norm(
            params, self.grad_clip or math.inf, self.mesh.group("tp") if self.mesh.tp > 1 else None,
            counted=self.pipeline.counted if self.pipeline else None,
            pp_group=self.mesh.group("pp") if self.pipeline else None,
        ).item()
        applied = loss_is_finite and math.isfinite(grad_norm)  # the same global values on every rank
        if applied:  # otherwise the weights and Adam's moments stay as they were
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied


class _DeepSpeedGroups:
    """The `mpu` DeepSpeed asks for: its data-parallel group is our `dp_sp` (every rank holding the same
    parameters); there is no model parallelism under this engine (tp = pp = 1), so that group is this rank alone."""

    def __init__(self, mesh: ParallelMesh):
        self.data = mesh.group("dp_sp")
        self.alone = mesh.group("tp")  # size 1 under this engine

    def get_data_parallel_group(self):
        return self.data

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.data)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.data)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.data)

    def get_model_parallel_group(self):
        return self.alone

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


def import_deepspeed():
    """DeepSpeed, imported with its start-up chatter (the accelerator it picked, op-builder notes) kept to
    warnings and errors, so that a run's output stays the progress bar and metrics."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")  # no auto-detect warning
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    logging.getLogger("compilers").setLevel(logging.WARNING)  # its op builders' compiler probes
    # DeepSpeed still calls collectives that torch has renamed; the warnings are DeepSpeed's to fix, not the user's.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
    return deepspeed


def _deepspeed_classes() -> list:
    """The classes DeepSpeed's checkpoint files hold besides tensors and plain containers (its ZeRO stage, loss
    scaler and bf16 fragment addresses; read from ZeRO 1-3 files, fp32 and bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Within this context every `torch.load` is weights-only, with `_deepspeed_classes` allowed. DeepSpeed reads
    its files with `torch.load(weights_only=False)`, which would run whatever code a crafted file holds; here such a
    file raises `pickle.UnpicklingError` naming what it holds instead."""
    real_load = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    with torch.serialization.safe_globals(_deepspeed_classes()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = real_load


def zero_fp32_state_dict(checkpoint: str) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from DeepSpeed's files in our checkpoint directory (its `zero_to_fp32`
    gathers the partitions), read weights-only; DeepSpeed's progress output is swallowed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(f"{checkpoint}/{DEEPSPEED_DIR}", tag=DEEPSPEED_TAG)


def zero_stage(cfg: Config) -> int:
    return cfg.trainer.zero_stage or 1


# ZeRO's gradient buckets, in elements: DeepSpeed's default reduce_bucket_size and allgather_bucket_size (5e8), or the
# whole model when it is smaller. DeepSpeed allocates a whole reduce bucket before the first gradient arrives (ZeRO-1
# and 2: one flat buffer, fp32 under ZeRO-1, the weights' width under ZeRO-2; ZeRO-3: one of the weights' width), so
# on a GPU a default bucket holds 5e8 elements whatever the model; one no larger than the model holds the same
# gradients and keeps that memory what the planner says (`seqpar.plan.estimate`).
ZERO_BUCKET_ELEMENTS = 500_000_000


def zero_bucket_elements(model_elements: int) -> int:
    """The reduce (and all-gather) bucket for a model of `model_elements`: the default, or the whole model rounded
    up to a multiple of 1024 (DeepSpeed wants its all-gather bucket aligned)."""
    return min(ZERO_BUCKET_ELEMENTS, -(-model_elements // 1024) * 1024)


def deepspeed_config(cfg: Config, micro_batch_size: int, accumulation_steps: int, data_ranks: int,
                     model_elements: int = ZERO_BUCKET_ELEMENTS) -> dict:
    """DeepSpeed's JSON config for this run. The batch numbers are only for DeepSpeed's own consistency check
    (our loader makes the batches); the optimizer is ours, passed in: torch's AdamW (no compiled FusedAdam), or
    with `trainer.offload_optimizer` DeepSpeed's CPU Adam, which ZeRO-Offload runs on the host over the fp32
    partitions and Adam's moments it keeps there (pinned for asynchronous copies when a GPU is there). The gradient
    buckets are sized for a model of `model_elements` (`zero_bucket_elements`)."""
    t = cfg.trainer
    bucket = zero_bucket_elements(model_elements)
    zero = {"stage": zero_stage(cfg), "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch_size * accumulation_steps * data_ranks,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, not one of DeepSpeed's own
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO over the dp_sp ranks; the model, its sequence-parallel attention and the loss stay ours."""

    name = "deepspeed"
    folder = DEEPSPEED_DIR  # what `save` writes inside a checkpoint directory

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: ParallelMesh, cfg: Config,
                 micro_batch_size: int, accumulation_steps: int):
        deepspeed = import_deepspeed()
        self.data_ranks = mesh.dp * mesh.sp
        self.stage = zero_stage(cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer,
            config=deepspeed_config(cfg, micro_batch_size, accumulation_steps, self.data_ranks,
                                    sum(p.numel() for p in model.parameters())),
            mpu=_DeepSpeedGroups(mesh) if mesh.world_size > 1 else None,
            dist_init_required=False,
        )
        self.model = self.engine.module

    def forward(self, **inputs) -> torch.Tensor:
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages over its data-parallel group; our losses want the sum (see the module's docstring).
        self.engine.backward(loss * self.data_ranks, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-batches in step(); it updates only at the boundary

    def step(self, loss_is_finite: bool, grad_scale: float | None = None) -> tuple[float, bool]:
        assert grad_scale is None, "DeepSpeed runs without pipeline parallelism"
        self.engine.step()  # reduce (or reduce-scatter) the gradients, clip, update: ZeRO's partitioned step
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        return grad_norm, bool(self.engine.was_step_applied())

    @property
    def partitions_parameters(self) -> bool:
        return self.stage == 3

    def gathered(self):
        """A context in which every parameter is whole (ZeRO-3 gathers its partitions); every rank enters it."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), enabled=self.stage == 3)

    def save(self, checkpoint: str) -> None:
        """DeepSpeed's own checkpoint (module, ZeRO partitions) inside our checkpoint directory."""
        self.engine.save_checkpoint(f"{checkpoint}/{DEEPSPEED_DIR}", tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, checkpoint: str) -> None:
        with weights_only_loads():  # a crafted file raises instead of running code
            path, _ = self.engine.load_checkpoint(f"{checkpoint}/{DEEPSPEED_DIR}", tag=DEEPSPEED_TAG,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {checkpoint}/{DEEPSPEED_DIR}")
