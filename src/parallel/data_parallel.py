"""Data parallelism over the `dp_sp` ranks, and gradient clipping by the global norm.

Every rank of dp x sp holds the same parameters (or the same tensor-parallel shards of them) and computes gradients
from different tokens (different sequences across dp, different chunks of the same sequences across sp). The
trainer divides each rank's summed loss by the number of target tokens in the whole global batch, so the full
gradient is the *sum* of the ranks' gradients: `GradientReducer` all-reduces (SUM) every gradient over `dp_sp`
once per optimizer step, after the last micro-batch, in flat buckets.

Why not DDP: DDP cannot wrap a model whose parameters are DTensors (tensor parallelism) with tied weights, and
pipeline schedules run backward themselves; one explicit reduction after backward composes with both. It gives up
DDP's overlap of the all-reduce with backward, which matters little here: in the long-sequence regime parameters
are small next to activations (sp divides those). FSDP2 would also shard parameters and optimizer state; it is the
next step when models outgrow one device.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 32 * 1024 * 1024


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def match_grad_placements(params: list[nn.Parameter]) -> None:
    """Give every DTensor gradient its parameter's placement (autograd may leave e.g. a vocab-sharded embedding's
    gradient replicated, and leaves a replicated key/value head's gradient Partial over the ranks sharing it: this
    sums it), so reductions and the optimizer see each rank's own shard."""
    for p in params:
        g = p.grad
        if g is not None and hasattr(g, "placements") and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)


class GradientReducer:
    """Sum the gradients of `params` over `group` (one all-reduce per bucket of up to 32 MiB)."""

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup):
        self.params, self.group = params, group

    def reduce(self) -> None:
        grads = [local_tensor(p.grad) for p in self.params if p.grad is not None]
        bucket, size = [], 0
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= BUCKET_BYTES:
                self._flush(bucket)
                bucket, size = [], 0
        if bucket:
            self._flush(bucket)

    def _flush(self, bucket: list[torch.Tensor]) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in bucket:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for g in same:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def _is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and any(not pl.is_replicate() for pl in t.placements)


def _copies(t: torch.Tensor) -> int:
    """How many ranks of its mesh hold each element of a DTensor: the sizes of the axes it is replicated over (a
    key/value projection replicated over the ranks that share its head, `tensor.ReplicatedKeyValue`)."""
    return math.prod(t.device_mesh.size(i) for i, pl in enumerate(t.placements) if pl.is_replicate())


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, tp_group=None, counted=None, pp_group=None) -> torch.Tensor:
    """Clip by the global 2-norm over all parameters and return it.

    Sharded (DTensor) gradients contribute their local shard, summed over `tp_group` (a shard that several tp ranks
    hold, divided by their number); replicated gradients count once. `counted(p)` may exclude parameters whose
    gradient is a duplicate held elsewhere (a tied copy). Pipeline stages hold different parameters: their squared
    norms are summed over `pp_group`.
    """
    grads = [p.grad for p in params if p.grad is not None and (counted is None or counted(p))]
    sharded = [(local_tensor(g), _copies(g)) for g in grads if _is_sharded(g)]
    plain = [local_tensor(g) for g in grads if not _is_sharded(g)]  # plain tensors and replicated DTensors
    device = (sharded[0][0] if sharded else plain[0]).device if (sharded or plain) else torch.device("cpu")
    sq_sharded = sum((g.float().pow(2).sum() / copies for g, copies in sharded), torch.zeros((), device=device))
    if tp_group is not None and sharded:
        dist.all_reduce(sq_sharded, group=tp_group)
    sq_plain = sum((g.float().pow(2).sum() for g in plain), torch.zeros((), device=device))
    sq = sq_sharded + sq_plain
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                local_tensor(p.grad).mul_(coef)
    return total
