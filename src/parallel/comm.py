"""Small communication primitives for sequence parallelism. Each says which collective runs, and when.

- `RingExchange.start(t)`: point-to-point, non-blocking: send `t` to the next rank of the ring and receive the
  same-shaped tensor from the previous one (`batch_isend_irecv`). `wait()` returns the received tensor. Ring
  attention starts the exchange of the next key/value block, computes on the current one, then waits, so the
  transfer overlaps the compute. These are used inside autograd functions whose backward runs its own exchanges,
  so the primitive itself has no backward.
- `all_gather_list(t, group)`: all-gather of a small non-differentiable tensor (the padding masks of every chunk).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RingExchange:
    """One step of a ring: rank r sends to r+1 and receives from r-1 (ranks within `group`, cyclic)."""

    def __init__(self, group: dist.ProcessGroup | None, tag: int = 0):
        self.group = group
        self.tag = tag
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size) if group is not None else (self.rank + 1) % self.size
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size) if group is not None else (self.rank - 1) % self.size
        self._reqs: list = []
        self._recv: torch.Tensor | None = None

    def start(self, t: torch.Tensor) -> RingExchange:
        assert not self._reqs, "exchange already in flight"
        t = t.contiguous()
        self._recv = torch.empty_like(t)
        ops = [
            dist.P2POp(dist.isend, t, self.next, self.group, self.tag),
            dist.P2POp(dist.irecv, self._recv, self.prev, self.group, self.tag),
        ]
        self._reqs = dist.batch_isend_irecv(ops)
        return self

    def wait(self) -> torch.Tensor:
        for req in self._reqs:
            req.wait()
        self._reqs = []
        out, self._recv = self._recv, None
        return out


def all_gather_list(t: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape everywhere), in rank order of `group`. No autograd."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out
