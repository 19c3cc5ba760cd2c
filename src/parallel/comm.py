"""Small communication primitives for sequence parallelism. Each says which collective runs, and when.

- `RingExchange.start(*ts)`: point-to-point, non-blocking: send the tensors `ts` to the next rank of the ring and
  receive same-shaped ones from the previous rank (`batch_isend_irecv`). `wait()` returns the received tensors.
  Ring attention starts the exchange of the next key/value block, computes on the current one, then waits, so the
  transfer overlaps the compute; k and v travel as they are (no stacked copy). These are used inside autograd
  functions whose backward runs its own exchanges, so the primitive itself has no backward.
  On CUDA with NCCL the transfer runs on NCCL's own stream (the side stream): `start` orders it after the compute
  stream's work so far (the tensors to send are ready), `wait` makes the compute stream wait for it without
  blocking the host, so the next block's kernels queue at once and the GPU runs them during the transfer. Tensors
  in flight are kept alive by the process group until the exchange is waited for. With gloo (CPU) the transfer runs
  on gloo's threads and `wait` blocks until it is done.
- `all_gather_list(t, group)`: all-gather of a small non-differentiable tensor (the padding masks of every chunk).
- `ring_pass(x, group, visit, grad)`: n - 1 ring exchanges that show every rank's chunk to `visit`; with `grad`,
  n more exchanges carry a gradient accumulator with each chunk back to its owner (Ring Self-Attention uses it
  in forward for keys and values, and in backward for their gradients).
- `seq_to_heads` / `heads_to_seq`: one `all_to_all_single` each way between sequence and head sharding; each is
  the other's backward (Ulysses).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.torch_compat import all_gather_single, reduce_scatter_single


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
        self._recv: list[torch.Tensor] = []

    def start(self, *tensors: torch.Tensor) -> RingExchange:
        assert not self._reqs, "exchange already in flight"
        # A tensor whose memory is dense in another dimension order (attention's (B, H, T, D) views of (B, T, H, D)
        # projections) travels as its dense view, without a copy, and arrives with the same strides; one that is
        # not dense (a head slice of such a view) travels as a contiguous copy and arrives contiguous.
        sends, orders = zip(*(_dense_view(t) for t in tensors), strict=True)
        recvs = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in sends]
        self._recv = [r.permute(_inverse(order)) for r, order in zip(recvs, orders, strict=True)]
        # one tag per tensor: gloo matches messages by (peer, tag); NCCL ignores tags and keeps the order
        tags = [self.tag * 16 + i for i in range(len(sends))]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t, tag in zip(sends, tags, strict=True)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t, tag in zip(recvs, tags, strict=True)]
        self._reqs = dist.batch_isend_irecv(ops)
        return self

    def wait(self) -> list[torch.Tensor]:
        for req in self._reqs:
            req.wait()
        self._reqs = []
        out, self._recv = self._recv, []
        return out


def _dense_view(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A contiguous view of `t`'s memory (its dims ordered by decreasing stride) and that order, or a contiguous
    copy of `t` (and the identity order) when its memory is not dense (a slice)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    view = t.permute(order)
    return (view, order) if view.is_contiguous() else (t.contiguous(), list(range(t.dim())))


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return inv


def all_gather_list(t: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape everywhere), in rank order of `group`. No autograd."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def ring_pass(x: torch.Tensor, group, visit, grad: bool = False) -> torch.Tensor | None:
    """Show this rank every rank's `x` in turn: `visit(src, x_src)` for src = r, r-1, ..., r-n+1 (n - 1 ring
    exchanges, each overlapped with the visit of the current chunk).

    With `grad=True`, `visit` returns a gradient for `x_src`; an fp32 accumulator travels with each chunk (n more
    exchanges) and the sum of every rank's gradient for this rank's own `x` is returned.
    """
    ring, acc_ring = RingExchange(group, tag=2), RingExchange(group, tag=3)
    n, r = ring.size, ring.rank
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if grad else None
    for i in range(n):
        src = (r - i) % n
        if i < n - 1:
            ring.start(x)
        g = visit(src, x)
        if grad:
            if i > 0:
                (acc,) = acc_ring.wait()  # the accumulator of chunk `src`, from the previous rank
            acc += g
            if n > 1:
                acc_ring.start(acc)  # on to the next rank, with the chunk it belongs to
        if i < n - 1:
            (x,) = ring.wait()
    if not grad:
        return None
    return acc_ring.wait()[0] if n > 1 else acc  # after n exchanges our own chunk's accumulator is home


class _AllToAll(torch.autograd.Function):
    """Sequence-sharded (B, H, T/n, D) <-> head-sharded (B, H/n, T, D) by one `all_to_all_single`.

    Forward to heads: rank r sends head group j of its chunk to rank j and receives every rank's chunk of head
    group r (sequence in rank order). Backward is the inverse all-to-all, so gradients go back where they came from.
    """

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return _all_to_all(x, group, to_heads)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g.contiguous(), ctx.group, not ctx.to_heads), None, None


def _all_to_all(x: torch.Tensor, group, to_heads: bool) -> torch.Tensor:
    n = dist.get_world_size(group)
    b, h, t, d = x.shape
    if to_heads:  # (B, H, c, D) -> (n, B, H/n, c, D): piece j goes to rank j
        send = x.reshape(b, n, h // n, t, d).transpose(0, 1).contiguous()
    else:  # (B, H/n, L, D) -> (n, B, H/n, L/n, D): sequence chunk j goes back to rank j
        send = x.reshape(b, h, n, t // n, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    if to_heads:  # recv[i] = rank i's chunk of our heads -> (B, H/n, n*c, D)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * t, d)
    return recv.transpose(0, 1).reshape(b, n * h, t // n, d)  # recv[i] = our chunk of head group i


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H, T/n, D) sequence chunk -> (B, H/n, T, D) all of the sequence for this rank's heads (differentiable)."""
    return _AllToAll.apply(x, group, True)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of `seq_to_heads` (differentiable)."""
    return _AllToAll.apply(x, group, False)


class _GatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim: int):
        ctx.group, ctx.dim = group, dim
        n = dist.get_world_size(group)
        front = x.movedim(dim, 0).contiguous()
        out = torch.empty((n * front.shape[0], *front.shape[1:]), dtype=x.dtype, device=x.device)
        all_gather_single(out, front, group=group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, g):
        n = dist.get_world_size(ctx.group)
        front = g.movedim(ctx.dim, 0).contiguous()
        out = torch.empty((front.shape[0] // n, *front.shape[1:]), dtype=g.dtype, device=g.device)
        reduce_scatter_single(out, front, group=ctx.group)
        return out.movedim(0, ctx.dim), None, None


def gather_along(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim` in rank order. Forward: all-gather; backward: reduce-scatter (each
    rank gets the sum over ranks of its part's gradient)."""
    return _GatherAlong.apply(x, group, dim)
