"""Ring attention (`parallel.sp_impl=ring`, the default): blockwise attention with an online softmax.

Each rank keeps its queries; key/value blocks travel around the ring (sp - 1 exchanges, each overlapped with the
current block's compute). Per block a fused kernel returns the block output and its log-sum-exp; blocks are merged
with the log-sum-exp, so no L x L or L/sp x L score matrix ever exists. Under zigzag a block is either the diagonal
one (causal kernel), one whose second half lies entirely after every local query (only the first half of the keys
is used) or one that only the second half of the local queries sees (only those queries are used): fully masked
work is skipped. Backward recomputes per block from the saved output and log-sum-exp; the key/value gradients
travel around the ring with their block and arrive home after sp exchanges.

Communication: forward, sp - 1 ring exchanges of the stacked (k, v) chunk plus one all-gather of the padding masks;
backward, sp - 1 exchanges of (k, v) and sp exchanges of their fp32 gradient accumulators.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.parallel.comm import RingExchange, all_gather_list
from seqpar.parallel.sequence.kernels import block_backward, block_forward, key_bias, merge_into, no_key_rows


# ------------------------------------------------------------------------------------------ ring attention
def _plan(rank: int, src: int, causal: bool, t: int):
    """(query slice, key slice, causal kernel?) for the block of rank `src` seen from `rank`; zigzag if causal."""
    full, half = slice(0, t), t // 2
    if not causal:
        return full, full, False
    if src == rank:
        return full, full, True
    if src < rank:  # its later chunk lies after all our queries: keys' first half only
        return full, slice(0, half), False
    return slice(half, t), full, False  # its chunks lie after our early chunk: our later half only


# ------------------------------------------------------------------------------------------ ring attention
class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, causal: bool, group):
        ring = RingExchange(group, tag=0)
        n, r = ring.size, ring.rank
        masks = all_gather_list(key_mask, group) if key_mask is not None else [None] * n
        t = q.shape[-2]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for i in range(n):
            src = (r - i) % n
            if i < n - 1:
                ring.start(kv)  # next block in flight while this one computes
            qs, ks, blk_causal = _plan(r, src, causal, t)
            m = masks[src][:, ks] if masks[src] is not None else None
            blk_out, blk_lse = block_forward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], blk_causal, key_bias(m, q.dtype))
            merge_into(out[:, :, qs], lse[:, :, qs], blk_out, no_key_rows(blk_lse, m))
            if i < n - 1:
                kv = ring.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.masks, ctx.causal, ctx.group = masks, causal, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        lse = torch.where(torch.isinf(lse), 0.0, lse)  # a query with no key at all: its probabilities stay 0
        masks, causal, group = ctx.masks, ctx.causal, ctx.group
        kv_ring, dkv_ring = RingExchange(group, tag=0), RingExchange(group, tag=1)
        n, r = kv_ring.size, kv_ring.rank
        t = q.shape[-2]
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        in_flight = False
        for i in range(n):
            src = (r - i) % n
            if i < n - 1:
                kv_ring.start(kv)
            qs, ks, blk_causal = _plan(r, src, causal, t)
            m = masks[src][:, ks] if masks[src] is not None else None
            g = block_backward(
                dout[:, :, qs], q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks],
                out[:, :, qs], lse[:, :, qs].contiguous(), blk_causal, key_bias(m, q.dtype),
            )
            dq[:, :, qs] += g[0]
            if in_flight:
                dkv = dkv_ring.wait()  # the gradient buffer of block `src`, from the previous rank
            dkv[0][:, :, ks] += g[1]
            dkv[1][:, :, ks] += g[2]
            if n > 1:
                dkv_ring.start(dkv)  # on to the next rank, with the block it belongs to
                in_flight = True
            if i < n - 1:
                kv = kv_ring.wait()
        if n > 1:
            dkv = dkv_ring.wait()  # after n exchanges our own block's gradients are home
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


class RingAttention:
    """A core-attention function (see `seqpar.models.attention`) that runs ring attention over `group`.

    Inputs are this rank's chunk: contiguous for bidirectional attention, zigzag for causal attention.
    """

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def __call__(self, q, k, v, *, causal: bool, key_padding_mask: torch.Tensor | None, dropout_p: float):
        if dropout_p:
            raise ValueError("ring attention has no attention dropout; set model.attn_dropout=0")
        if causal and q.shape[-2] % 2:
            raise ValueError(f"causal ring attention needs an even local length (zigzag halves), got {q.shape[-2]}")
        mask = key_padding_mask.bool() if key_padding_mask is not None else None
        return _RingAttentionFn.apply(q, k, v, mask, causal, self.group)
