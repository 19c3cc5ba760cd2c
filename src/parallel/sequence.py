"""Sequence parallelism: sequence chunks and ring attention across the ranks of an sp group.

Chunk layout (`chunk_indices`): bidirectional models (BERT) give rank r the contiguous r-th of sp chunks; causal
models (GPT) cut the sequence into 2*sp chunks and give rank r chunks r and 2*sp-1-r ("zigzag"), so every rank has
the same amount of causal work. Positions, labels and masks are cut with the same indices.

`RingAttention` is blockwise attention with an online softmax: each rank keeps its queries, and key/value blocks
travel around the ring (sp - 1 exchanges, each overlapped with the current block's compute). Per block a fused
kernel returns the block output and its log-sum-exp; blocks are merged with the log-sum-exp, so no L x L or
L/sp x L score matrix ever exists. Under zigzag a block is either the diagonal one (causal kernel), one whose second
half lies entirely after every local query (only the first half of the keys is used) or one that only the second
half of the local queries sees (only those queries are used): fully masked work is skipped. Backward recomputes
per block from the saved output and log-sum-exp; the key/value gradients travel around the ring with their block
and arrive home after sp exchanges.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from seqpar.parallel.comm import RingExchange, all_gather_list

aten = torch.ops.aten


# ------------------------------------------------------------------------------------------------- chunks
def chunk_indices(seq_len: int, sp: int, rank: int, zigzag: bool) -> torch.Tensor:
    """Positions of the global sequence held by `rank` (contiguous, or chunks r and 2*sp-1-r for zigzag)."""
    parts = 2 * sp if zigzag else sp
    if seq_len % parts:
        layout = "zigzag (causal)" if zigzag else "contiguous"
        raise ValueError(f"sequence length {seq_len} is not divisible by {parts}, needed for the {layout} layout at sp={sp}")
    c = seq_len // parts
    if not zigzag:
        return torch.arange(rank * c, (rank + 1) * c)
    j = 2 * sp - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange(j * c, (j + 1) * c)])


def shard_sequence(x: torch.Tensor, sp: int, rank: int, zigzag: bool, dim: int = 1) -> torch.Tensor:
    """This rank's chunk of `x` along `dim` (the sequence dim)."""
    return x.index_select(dim, chunk_indices(x.shape[dim], sp, rank, zigzag).to(x.device))


# ------------------------------------------------------------------------------------------- block kernels
def _bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, Tk) bool key mask -> (B, 1, 1, Tk) additive bias (0 or -inf), or None."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))[:, None, None, :]


def _causal_bias(bias: torch.Tensor | None, tq: int, tk: int, like: torch.Tensor) -> torch.Tensor:
    tri = torch.zeros(tq, tk, dtype=like.dtype, device=like.device).masked_fill(
        ~torch.ones(tq, tk, dtype=torch.bool, device=like.device).tril(), float("-inf")
    )
    return tri if bias is None else bias + tri


def block_forward(q, k, v, causal: bool, bias):
    """(out, lse) of one block: out like q, lse (B, H, Tq) float32 natural log."""
    if causal and bias is not None:
        bias, causal = _causal_bias(bias, q.shape[-2], k.shape[-2], q), False
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias)
        return out, lse
    return _math_forward(q, k, v, causal, bias)


def block_backward(dout, q, k, v, out, lse, causal: bool, bias):
    """(dq, dk, dv) of one block given the *global* output and log-sum-exp of these queries."""
    if causal and bias is not None:
        bias, causal = _causal_bias(bias, q.shape[-2], k.shape[-2], q), False
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias
        )
    return _math_backward(dout, q, k, v, out, lse, causal, bias)


def _scores(q, k, causal, bias):
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.float()
    if causal:
        s = s + _causal_bias(None, q.shape[-2], k.shape[-2], s)
    return s


def _math_forward(q, k, v, causal, bias):
    """Reference kernel for devices without a fused one that returns the log-sum-exp (block-sized memory only)."""
    s = _scores(q, k, causal, bias)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return (p @ v.float()).to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, causal, bias):
    s = _scores(q, k, causal, bias)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    do = dout.float()
    dv = p.transpose(-1, -2) @ do
    dp = do @ v.float().transpose(-1, -2)
    ds = p * (dp - (do * out.float()).sum(-1, keepdim=True))
    scale = 1.0 / math.sqrt(q.shape[-1])
    dq = (ds @ k.float()) * scale
    dk = (ds.transpose(-1, -2) @ q.float()) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _no_keys(lse: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Set lse to -inf for batch rows whose block has no attendable key (kernels report 0 there)."""
    if mask is None:
        return lse
    return lse.masked_fill(~mask.any(-1)[:, None, None], float("-inf"))


def _merge(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """In place: combine a block's (out, lse) into the running fp32 (out, lse) with the log-sum-exp rule."""
    new = torch.logaddexp(lse, blk_lse)
    safe = torch.where(torch.isinf(new), 0.0, new)
    out.mul_(torch.exp(lse - safe)[..., None]).add_(blk_out.float() * torch.exp(blk_lse - safe)[..., None])
    lse.copy_(new)


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
            blk_out, blk_lse = block_forward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], blk_causal, _bias(m, q.dtype))
            _merge(out[:, :, qs], lse[:, :, qs], blk_out, _no_keys(blk_lse, m))
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
                out[:, :, qs], lse[:, :, qs].contiguous(), blk_causal, _bias(m, q.dtype),
            )
            dq[:, :, qs] += g[0]
            if in_flight:
                dkv = dkv_ring.wait()  # the gradient buffer of block `src`, from the previous rank
            dkv[0][:, :, ks] += g[1]
            dkv[1][:, :, ks] += g[2]
            dkv_ring.start(dkv)  # on to the next rank, with the block it belongs to
            in_flight = True
            if i < n - 1:
                kv = kv_ring.wait()
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
