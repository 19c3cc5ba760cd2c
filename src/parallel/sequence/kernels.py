"""Per-block attention kernels that return (and accept) the log-sum-exp, and the log-sum-exp merge.

On CPU these are PyTorch's fused flash-attention kernels (`aten._scaled_dot_product_flash_attention_for_cpu` and its
backward, which accepts an outside output and log-sum-exp); elsewhere a math kernel with block-sized memory.
Masks are additive float biases: a (B, 1, 1, Tk) padding bias, plus a lower-triangular one when a block is both
causal and padded.
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten


def key_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
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


def no_key_rows(lse: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Set lse to -inf for batch rows whose block has no attendable key (kernels report 0 there)."""
    if mask is None:
        return lse
    return lse.masked_fill(~mask.any(-1)[:, None, None], float("-inf"))


def merge_into(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """In place: combine a block's (out, lse) into the running fp32 (out, lse) with the log-sum-exp rule.

    `blk_out` is a kernel's fresh output and is scaled in place (fp32), so the merge allocates no output-sized
    temporary."""
    new = torch.logaddexp(lse, blk_lse)
    safe = torch.where(torch.isinf(new), 0.0, new)
    out.mul_(torch.exp(lse - safe)[..., None]).add_(blk_out.float().mul_(torch.exp(blk_lse - safe)[..., None]))
    lse.copy_(new)


