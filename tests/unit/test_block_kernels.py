"""The per-block attention kernels of ring attention: the device-generic math kernel against the fused CPU one."""

from __future__ import annotations

import pytest
import torch

from seqpar.parallel.sequence.kernels import (
    _math_backward,
    _math_forward,
    block_backward,
    block_forward,
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
