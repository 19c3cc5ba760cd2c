"""Ring attention's whole path in one process: each rank of a ring is a thread, and the ring's exchanges and
all-gathers are local copies between them, so one GPU runs the CUDA block kernels, the log-sum-exp merges, the
zigzag block plan and both backwards (the plain one and the memory-lean one) of `seqpar.parallel.sequence.ring`
exactly as the ranks of a job would, against SDPA on the whole sequence in float64.

Ranks as threads: a rank's forward and backward are `_RingAttentionFn`'s own static methods, called in the rank's
thread under `no_grad` (autograd runs the backward of CUDA tensors on one device thread, where ranks that wait for
each other would deadlock). `LocalExchange` stands in for `comm.RingExchange` (a send is a copy into the next
rank's mailbox, a receive takes from one's own) and `local_all_gather` for `comm.all_gather_list`.

A case passes when the ring's largest error (relative to the largest value of the reference) in the output and in
each gradient is at most three times SDPA's own on the same inputs and dtype, or within a floor (fp32: 1e-5,
bf16: 4e-3): a bf16 ring is held to bf16 SDPA's accuracy, not to float64's.
"""

from __future__ import annotations

import itertools
import queue
import threading
from contextlib import contextmanager
from unittest import mock

import torch
import torch.nn.functional as F

from seqpar.models.attention import repeat_kv
from seqpar.parallel.sequence import chunk_indices, ring
from seqpar.parallel.sequence.kernels import key_bias

WAIT_S = 120  # a rank that waits longer for a peer has lost it (the peer failed)
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 4e-3}


class LocalRing:
    """The shared state of a ring of threads: a mailbox per (receiving rank, tag), a barrier for all-gathers."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=WAIT_S)
        self.slots: list = [None] * world
        self._boxes: dict[tuple[int, int], queue.Queue] = {}
        self._lock = threading.Lock()

    def box(self, rank: int, tag: int) -> queue.Queue:
        with self._lock:
            return self._boxes.setdefault((rank, tag), queue.Queue())


class LocalGroup:
    """What a rank passes to ring attention as its process group: its rank in a `LocalRing`."""

    def __init__(self, ring_: LocalRing, rank: int):
        self.ring, self.rank = ring_, rank


class LocalExchange:
    """`comm.RingExchange` between threads: `start` puts copies of the tensors into the next rank's mailbox,
    `wait` takes what the previous rank sent (messages of one tag from one sender arrive in order)."""

    def __init__(self, group: LocalGroup, tag: int = 0):
        self.group, self.tag = group, tag
        self.rank, self.size = group.rank, group.ring.world
        self._pending = False

    def start(self, *tensors: torch.Tensor) -> LocalExchange:
        assert not self._pending, "exchange already in flight"
        self.group.ring.box((self.rank + 1) % self.size, self.tag).put([t.clone() for t in tensors])
        self._pending = True
        return self

    def wait(self) -> list[torch.Tensor]:
        self._pending = False
        return self.group.ring.box(self.rank, self.tag).get(timeout=WAIT_S)


def local_all_gather(t: torch.Tensor, group: LocalGroup) -> list[torch.Tensor]:
    """`comm.all_gather_list` between threads: every rank's `t`, in rank order."""
    r = group.ring
    r.slots[group.rank] = t.clone()
    r.barrier.wait()
    out = list(r.slots)
    r.barrier.wait()  # nobody overwrites a slot before every rank has read them all
    return out


@contextmanager
def local_ring():
    """Ring attention's communication replaced by `LocalExchange` and `local_all_gather` while inside."""
    with mock.patch.object(ring, "RingExchange", LocalExchange), mock.patch.object(ring, "all_gather_list",
                                                                                   local_all_gather):
        yield


class _Ctx:
    """The autograd context `_RingAttentionFn.forward` saves into, for calling it outside autograd."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def ring_cases(device: str) -> list[dict]:
    """Every combination of ring size (2, and 4 with grouped-query attention), dtype, causal or bidirectional,
    padded or not, plain or memory-lean backward; shapes by device (chunks not multiples of 16 or 32 tokens, so the
    memory-efficient kernel's alignment is exercised)."""
    if device == "cuda":
        shape = {"batch": 2, "heads": 8, "head_dim": 64, "chunk": 300}
    else:
        shape = {"batch": 2, "heads": 4, "head_dim": 16, "chunk": 10}
    cases = []
    for world, dtype, causal, padded, lean in itertools.product((2, 4), ("float32", "bfloat16"), (False, True),
                                                                (False, True), (False, True)):
        kv_heads = shape["heads"] if world == 2 else 2
        cases.append({"world": world, "dtype": dtype, "causal": causal, "padded": padded, "lean": lean,
                      **shape, "kv_heads": kv_heads})
    return cases


def _inputs(case: dict, device: str):
    """q, k, v, dout (float64, on `device`) of the whole sequence, and a key mask (or None)."""
    g = torch.Generator().manual_seed(0)
    b, h, hk, d = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    seq = case["world"] * case["chunk"] * (2 if case["causal"] else 1)
    q, dout = (torch.randn(b, h, seq, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, hk, seq, d, generator=g, dtype=torch.float64) for _ in range(2))
    mask = None
    if case["padded"]:
        mask = torch.ones(b, seq, dtype=torch.bool)
        mask[1, seq // 3:] = False  # the later chunks of this sequence are all padding
        mask[0, -1] = False
    to = lambda x: x.to(device) if x is not None else None  # noqa: E731
    return to(q), to(k), to(v), to(dout), to(mask)


def sdpa(q, k, v, dout, causal: bool, mask):
    """Output and (dq, dk, dv) of SDPA on the whole sequence (k and v repeated to the query heads)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    attn_mask = None
    if mask is not None:
        attn_mask = mask[:, None, None, :]
        if causal:
            attn_mask = attn_mask & torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), attn_mask=attn_mask,
                                         is_causal=causal and attn_mask is None)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def ring_attention(q, k, v, dout, causal: bool, mask, world: int):
    """Output and (dq, dk, dv) of ring attention over `world` threads, reassembled into the whole sequence. With a
    mask, inputs are passed as the model passes them: (B, H, T, D) views of (B, T, H, D) memory."""
    seq = q.shape[-2]
    shared = LocalRing(world)
    results: list = [None] * world
    errors: list[BaseException] = []

    def rank(r: int):
        try:
            idx = chunk_indices(seq, world, r, causal).to(q.device)
            local = [x.index_select(2, idx) for x in (q, k, v, dout)]
            if mask is not None:
                local = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in local]
            local_mask = mask.index_select(1, idx) if mask is not None else None
            ctx = _Ctx()
            with torch.no_grad():
                out = ring._RingAttentionFn.forward(ctx, *local[:3], local_mask, None, causal, LocalGroup(shared, r))
                grads = ring._RingAttentionFn.backward(ctx, local[3])[:3]
            results[r] = (idx, out, grads)
        except BaseException as e:  # noqa: BLE001 - reported below; the barrier frees the other ranks
            errors.append(e)
            shared.barrier.abort()

    with local_ring():
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    out = torch.empty_like(q)
    grads = [torch.empty_like(x) for x in (q, k, v)]
    for idx, o, gs in results:
        out[:, :, idx] = o
        for full, g in zip(grads, gs, strict=True):
            full[:, :, idx] = g
    return out, *grads


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def run_case(case: dict, device: str) -> dict:
    """One case: ring attention in `case["dtype"]` against float64 SDPA, beside SDPA in that dtype."""
    dtype = getattr(torch, case["dtype"])
    q, k, v, dout, mask = _inputs(case, device)
    ref = sdpa(q, k, v, dout, case["causal"], mask)
    low = [x.to(dtype) for x in (q, k, v, dout)]
    base = sdpa(*low, case["causal"], mask)
    lean_min = 0 if case["lean"] else 2**62
    with mock.patch.object(ring, "LEAN_MIN_BYTES", lean_min):
        got = ring_attention(*low, case["causal"], mask, case["world"])
    rows = mask[:, None, :, None].expand_as(q) if mask is not None else slice(None)  # padded queries: anything
    row = {**case, "kernel": ring.block_kernel(low[0], key_bias(mask, dtype) if mask is not None else None),
           "ok": True}
    for name, g, b, r in zip(("out", "dq", "dk", "dv"), got, base, ref, strict=True):
        sel = rows if name == "out" else slice(None)
        err, base_err = _rel_err(g[sel], r[sel]), _rel_err(b[sel], r[sel])
        row[f"{name}_err"], row[f"{name}_sdpa_err"] = err, base_err
        row["ok"] &= err <= max(3 * base_err, FLOOR[dtype])
    return row
