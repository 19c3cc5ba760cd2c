"""The per-block attention kernels of ring attention: the device-generic math kernel against the fused CPU one."""

from __future__ import annotations

import pytest
import torch

from seqpar.parallel.sequence.kernels import (
    _math_backward,
    _math_forward,
    block_backward,
    block_forward,
    block_kernel,
    key_bias,
    no_key_rows,
)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_math_kernel_matches_fused_kernel(causal, padded):
    """The math kernel (used where no fused kernel returns a log-sum-exp) equals the fused CPU kernel."""
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(2, 3, 11, 8) for _ in range(4))
    mask = None
    if padded:
        mask = torch.ones(2, 11, dtype=torch.bool)
        mask[1, :] = False  # a block with no attendable key for one sequence
        mask[0, 7:] = False
    bias = key_bias(mask, q.dtype)
    out, lse = block_forward(q, k, v, causal, bias)
    lse = no_key_rows(lse, mask)
    m_out, m_lse = _math_forward(q, k, v, causal, bias)
    ok = torch.isfinite(m_lse)
    torch.testing.assert_close(m_lse[ok], lse[ok], atol=1e-5, rtol=0)
    assert torch.equal(torch.isinf(m_lse), torch.isinf(lse))
    torch.testing.assert_close(m_out[ok], out[ok], atol=1e-5, rtol=0)
    fused = block_backward(dout, q, k, v, out, lse.clamp(min=-1e30), causal, bias)
    math = _math_backward(dout, q, k, v, m_out, m_lse, causal, bias)
    for a, b in zip(fused, math, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _block_inputs(device, dtype, padded, t=40, d=16, seed=0):
    """q, k, v, dout of (2, 3, t, d) and a key mask (a block with no attendable key for the second sequence)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(2, 3, t, d, generator=g).to(device, dtype) for _ in range(4))
    mask = None
    if padded:
        mask = torch.ones(2, t, dtype=torch.bool)
        mask[0, t - 7 :] = False
        mask[1, :] = False
        mask = mask.to(device)
    return q, k, v, dout, mask


@pytest.mark.parametrize("dtype,padded,kernel", [
    (torch.bfloat16, False, "flash"),
    (torch.float16, False, "flash"),
    (torch.bfloat16, True, "efficient"),  # FlashAttention takes no mask
    (torch.float32, False, "efficient"),  # nor fp32
    (torch.float32, True, "efficient"),
])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_calls_on_the_meta_device(dtype, padded, kernel, causal):
    """The CUDA kernels' calls, run by PyTorch's meta kernels: the right kernel is chosen, every argument is
    accepted, the log-sum-exp comes back as (B, H, Tq) fp32 (the memory-efficient kernel's padding to 32 queries
    removed) and the gradients have the inputs' shapes and dtypes. 40 keys: the bias needs its 16-alignment."""
    q, k, v, dout, mask = _block_inputs("meta", dtype, padded)
    bias = key_bias(mask, q.dtype)
    assert block_kernel(q, bias) == kernel
    out, lse = block_forward(q, k, v, causal, bias)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, 3, 40) and lse.dtype == torch.float32
    grads = block_backward(dout, q, k, v, out, lse, causal, bias)
    assert [(g.shape, g.dtype) for g in grads] == [(q.shape, dtype)] * 3


def test_kernel_choice_falls_back_to_math():
    """Head sizes the fused CUDA kernels do not take, and devices without them, use the math kernel."""
    q = torch.empty(1, 2, 8, 12, device="meta", dtype=torch.bfloat16)
    assert block_kernel(q, None) == "math"
    assert block_kernel(torch.empty(1, 2, 8, 16), None) == "cpu"
    assert block_kernel(torch.empty(1, 2, 8, 512, device="meta", dtype=torch.bfloat16), None) == "efficient"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,padded", [
    (torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False), (torch.float32, True),
])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernels_match_the_math_kernel(dtype, padded, causal):
    """On a GPU: the fused CUDA kernels' output, log-sum-exp and gradients (given an outside output and
    log-sum-exp, as ring attention's backward gives them) equal the math kernel's, in fp32 to 1e-4 and in bf16 to
    its rounding (2e-2)."""
    q, k, v, dout, mask = _block_inputs("cuda", dtype, padded, t=200, d=64)
    bias = key_bias(mask, q.dtype)
    out, lse = block_forward(q, k, v, causal, bias)
    lse = no_key_rows(lse, mask)
    m_out, m_lse = _math_forward(q, k, v, causal, bias)
    ok = torch.isfinite(m_lse)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse[ok], m_lse[ok], atol=tol, rtol=0)
    torch.testing.assert_close(out[ok].float(), m_out[ok].float(), atol=tol, rtol=0)
    safe = torch.where(torch.isinf(m_lse), 0.0, m_lse)
    fused = block_backward(dout, q, k, v, m_out, safe, causal, bias)
    math = _math_backward(dout, q, k, v, m_out, m_lse, causal, bias)
    for a, b in zip(fused, math, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol * 5, rtol=tol)
