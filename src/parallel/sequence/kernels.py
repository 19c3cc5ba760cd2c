"""Per-block attention kernels that return (and accept) the log-sum-exp, and the log-sum-exp merge.

Each kernel's backward accepts an outside output and log-sum-exp (the merged ones of all blocks). `block_kernel`
picks, by device, dtype, head size and mask:
- "cpu": PyTorch's fused CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`);
- "flash": FlashAttention-2 on CUDA (`aten._scaled_dot_product_flash_attention`): fp16/bf16, no mask, head size a
  multiple of 8 up to 256, compute capability 8.0 or newer;
- "efficient": the memory-efficient CUDA kernel (`aten._scaled_dot_product_efficient_attention`) for the rest on
  CUDA (fp32, or a padding mask, which it takes as an additive bias); its log-sum-exp is padded to a multiple of 32
  queries and its bias rows must be 16-aligned, both handled here;
- "math": a kernel of plain tensor ops with block-sized memory, anywhere else.
These aten ops are private to torch: `seqpar.torch_compat` lists the arguments passed to each here and checks them
at start-up. The CUDA kernels' calls are also exercised on the meta device (shapes, dtypes, argument order), so a machine
without a GPU checks them too; their numbers are checked against the math kernel where a GPU is present.
Grouped-query attention: k and v may have fewer heads than q; a block expands them to the query heads for its kernel
call only (`repeat_kv`), and its key/value gradients are summed back over each head's group, so what travels and
accumulates keeps the key/value heads.
Masks are additive float biases: a (B, 1, 1, Tk) padding bias or a (B, 1, Tq, Tk) document bias; a block that is
both causal and masked gets a lower-triangular bias added, except on CPU, whose kernel takes the causal flag and
a bias together (and skips the tiles above the diagonal).
"""

from __future__ import annotations

import math

import torch

from seqpar.models.attention import repeat_kv

aten = torch.ops.aten


def _grouped_sum(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A key or value gradient over the query heads (B, H, T, D) summed over each key/value head's group."""
    b, h, t, d = g.shape
    return g if h == kv_heads else g.view(b, kv_heads, h // kv_heads, t, d).sum(2)


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


def block_kernel(q: torch.Tensor, bias: torch.Tensor | None) -> str:
    """Which kernel computes a block of these queries with this bias: "cpu", "flash", "efficient" or "math"."""
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type not in ("cuda", "meta") or q.shape[-1] % 8:
        return "math"
    half = q.dtype in (torch.float16, torch.bfloat16)
    if bias is None and half and q.shape[-1] <= 256 and _ampere_or_newer(q.device):
        return "flash"
    return "efficient"


def _ampere_or_newer(device: torch.device) -> bool:
    return device.type == "meta" or torch.cuda.get_device_capability(device) >= (8, 0)


def block_forward(q, k, v, causal: bool, bias):
    """(out, lse) of one block: out like q, lse (B, H, Tq) float32 natural log."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    kernel = block_kernel(q, bias)
    if causal and bias is not None and kernel != "cpu":
        bias, causal = _causal_bias(bias, q.shape[-2], k.shape[-2], q), False
    if kernel == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias)
        return out, lse
    if kernel == "flash":
        out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
        return out, lse
    if kernel == "efficient":
        out, lse, *_ = aten._scaled_dot_product_efficient_attention(q, k, v, _aligned_bias(bias, q, k), True, 0.0, causal)
        if bias is not None:  # a query with no attendable key: 0, not NaN (the merge weighs it by exp(-inf) = 0)
            out = out.nan_to_num_(0.0)
        return out, lse[..., : q.shape[-2]]
    return _math_forward(q, k, v, causal, bias)


def block_backward(dout, q, k, v, out, lse, causal: bool, bias):
    """(dq, dk, dv) of one block given the *global* output and log-sum-exp of these queries (dk, dv with k's
    heads)."""
    kv_heads = k.shape[1]
    dq, dk, dv = _block_backward(dout, q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), out, lse, causal, bias)
    return dq, _grouped_sum(dk, kv_heads), _grouped_sum(dv, kv_heads)


def _block_backward(dout, q, k, v, out, lse, causal: bool, bias):
    kernel = block_kernel(q, bias)
    if causal and bias is not None and kernel != "cpu":
        bias, causal = _causal_bias(bias, q.shape[-2], k.shape[-2], q), False
    if kernel == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias
        )
    if kernel == "flash":
        # No dropout: the random-number state is never read; empty tensors of the forward's kinds stand in for it.
        seed = torch.empty(2, dtype=torch.uint64, device=q.device)
        offset = torch.empty((), dtype=torch.uint64, device=q.device)
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[-2], k.shape[-2], 0.0, causal, seed, offset
        )
    if kernel == "efficient":
        seed, offset = (torch.empty((), dtype=torch.long, device=q.device) for _ in range(2))
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, _aligned_bias(bias, q, k), out, _padded_lse(lse), seed, offset, 0.0,
            [True, True, True, False], causal,
        )
        return dq, dk, dv
    return _math_backward(dout, q, k, v, out, lse, causal, bias)


def _aligned_bias(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The bias as the memory-efficient kernel reads it: (B, H, Tq, Tk) with broadcast dimensions at stride 0 and
    rows 16-aligned (a padded buffer, sliced back to Tk keys)."""
    if bias is None:
        return None
    tk = k.shape[-2]
    if tk % 16:
        buf = bias.new_zeros(*bias.shape[:-1], tk + 16 - tk % 16)
        buf[..., :tk] = bias
        bias = buf[..., :tk]
    return bias.expand(q.shape[0], q.shape[1], q.shape[-2], tk)


def _padded_lse(lse: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp in the memory-efficient kernel's layout: queries padded to a multiple of 32."""
    tq = lse.shape[-1]
    if tq % 32 == 0:
        return lse.contiguous()
    out = lse.new_zeros(*lse.shape[:-1], tq + 32 - tq % 32)
    out[..., :tq] = lse
    return out


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


