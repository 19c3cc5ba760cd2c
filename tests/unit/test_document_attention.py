"""Single-device attention with document masking in query tiles (`document_attention`) against the dense
(B, 1, T, T) mask path: the same outputs and gradients, and no T x T mask on the way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqpar.models import attention
from seqpar.models.attention import document_attention, sdpa_attention

TILE, T = 16, 96
# Document lengths of a window of T tokens: one document; many short ones; one long and many short; documents
# crossing tile edges (17, 30 and 46 tokens start and end inside tiles).
LAYOUTS = {
    "one": [96],
    "short": [3, 5, 2, 7, 1, 4, 6, 2, 8, 3, 5, 9, 4, 2, 6, 3, 7, 5, 4, 10],
    "long_and_short": [70, 3, 5, 2, 7, 1, 8],
    "crossing": [17, 30, 3, 46],
}


def ids_of(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # (T,)


def batch_ids(layout: str) -> torch.Tensor:
    """(2, T): the layout, and in the second row the layout reversed (other edges, so tiles span both rows')."""
    lengths = LAYOUTS[layout]
    return torch.stack([ids_of(lengths), ids_of(lengths[::-1])])


def inputs(dtype, gqa: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kv_heads = 2 if gqa else 4
    q = torch.randn(2, 4, T, 8, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, kv_heads, T, 8, generator=g).to(dtype).requires_grad_() for _ in range(2))
    return q, k, v


def padding(padded: bool) -> torch.Tensor | None:
    if not padded:
        return None
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, -11:] = False  # the tail of the last document, and of row 1 a few tokens in its middle
    mask[1, 40:45] = False
    return mask


def outputs_and_grads(fn, q, k, v, **kw):
    out = fn(q, k, v, dropout_p=0.0, **kw)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out) + torch.linspace(0, 1, out.shape[-1]))
    return out, grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_tiles_equal_the_dense_mask(layout, causal, padded, gqa):
    """fp32: tiled and dense outputs and q/k/v gradients agree to 1e-5."""
    q, k, v = inputs(torch.float32, gqa)
    kw = dict(causal=causal, key_padding_mask=padding(padded), document_ids=batch_ids(layout))
    dense = outputs_and_grads(sdpa_attention, q, k, v, **kw)  # T below DENSE_DOCUMENT_TOKENS: the dense mask
    tiled = outputs_and_grads(document_attention, q, k, v, tile=TILE, **kw)
    for a, b in zip([dense[0], *dense[1]], [tiled[0], *tiled[1]], strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_tiles_equal_the_dense_mask_in_bf16(causal):
    """bf16: agreement to bf16's resolution (atol 2e-2, rtol 2e-2; the key gradients are summed over tiles in
    fp32 and rounded once, the dense kernel rounds once too)."""
    q, k, v = inputs(torch.bfloat16, gqa=True)
    kw = dict(causal=causal, key_padding_mask=padding(True), document_ids=batch_ids("crossing"))
    dense = outputs_and_grads(sdpa_attention, q, k, v, **kw)
    tiled = outputs_and_grads(document_attention, q, k, v, tile=TILE, **kw)
    for a, b in zip([dense[0], *dense[1]], [tiled[0], *tiled[1]], strict=True):
        torch.testing.assert_close(b.float(), a.float(), atol=2e-2, rtol=2e-2)


def _mask_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """Spy on SDPA: the shape of every attention mask it is given (a lower-right CausalBias counted as the
    (Tq, Tk) mask it stands for: on CPU it is built)."""
    shapes, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            shapes.append(tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return shapes


@pytest.mark.parametrize("causal", [True, False])
def test_no_sequence_squared_mask_beyond_the_dense_threshold(monkeypatch, causal):
    """Above DENSE_DOCUMENT_TOKENS `sdpa_attention` with documents never builds a T x T mask, in forward or
    backward: every mask is at most a tile of queries by the keys of a tile and the longest document on each side."""
    t = 2 * attention.DENSE_DOCUMENT_TOKENS
    lengths = [700, 5, 300, 1, 1000] + [45] * ((t - 2006) // 45)
    lengths.append(t - sum(lengths))
    ids = ids_of(lengths)[None]
    q = torch.randn(1, 2, t, 8, requires_grad=True)
    k, v = (torch.randn(1, 1, t, 8, requires_grad=True) for _ in range(2))
    shapes = _mask_shapes(monkeypatch)
    out = sdpa_attention(q, k, v, causal=causal, key_padding_mask=None, dropout_p=0.0, document_ids=ids)
    out.sum().backward()
    assert shapes, "the tiles crossing documents take a mask"
    tile, widest = attention.DOCUMENT_TILE, max(lengths)
    assert all(s[-2] <= tile and s[-1] <= tile + 2 * widest for s in shapes), max(shapes, key=lambda s: s[-1])
    assert max(s[-2] * s[-1] for s in shapes) < t * t / 8


def test_dense_mask_below_the_threshold(monkeypatch):
    """Up to DENSE_DOCUMENT_TOKENS one call with the whole (B, 1, T, T) mask (cheaper than tiles when short)."""
    shapes = _mask_shapes(monkeypatch)
    q, k, v = inputs(torch.float32, gqa=True)
    sdpa_attention(q, k, v, causal=True, key_padding_mask=None, dropout_p=0.0, document_ids=batch_ids("short"))
    assert shapes == [(2, 1, T, T)]


def test_decreasing_document_ids_are_refused():
    q, k, v = inputs(torch.float32, gqa=False)
    ids = batch_ids("crossing").flip(-1)
    with pytest.raises(ValueError, match="must not decrease"):
        document_attention(q, k, v, causal=True, key_padding_mask=None, dropout_p=0.0, document_ids=ids, tile=TILE)
