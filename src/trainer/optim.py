"""AdamW with decay on matrices only, and a linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from seqpar.config import TrainerConfig
from seqpar.trainer.engine import import_deepspeed


def build_optimizer(model: nn.Module, t: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW; LayerNorm weights and all biases (the 1-D parameters) get no weight decay.

    The fused kernel (one pass over each parameter's state) where torch has one for the device and the parameters
    are plain tensors: on CPU much faster than the per-op foreach path (docs/benchmarks.md, throughput), and equal to
    it up to rounding."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.offload_optimizer:  # DeepSpeed's ZeRO-Offload steps on the host with its own AdamW (`host_adamw`)
        return host_adamw(groups, t)
    # Not for tensor-parallel DTensors: the fused kernel mixes them with its plain step counters.
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused or None)


def host_adamw(groups: list[dict], t: TrainerConfig) -> torch.optim.Optimizer:
    """DeepSpeed's CPU Adam in AdamW mode (decoupled weight decay, as torch's AdamW): the optimizer ZeRO-Offload
    requires, which updates the fp32 partitions in host memory with vectorised host code (a compiled op, built on
    first use and cached in torch's extensions folder)."""
    import_deepspeed()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, adamw_mode=True)


def lr_at(step: int, t: TrainerConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine down to lr * min_lr_ratio."""
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    floor = t.lr * t.min_lr_ratio
    return floor + 0.5 * (t.lr - floor) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, t: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, t) / t.lr)
