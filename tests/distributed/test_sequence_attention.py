"""Every sequence-parallel attention (ring, rsa, ulysses) over gloo processes against
F.scaled_dot_product_attention on the whole sequence, forward and backward; also with grouped-query attention
(fewer key/value heads than query heads, for ulysses fewer than sp), against SDPA with k and v repeated to the query
heads; and with document masking (`document_ids`), against SDPA with the explicit block-diagonal mask."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.models.attention import repeat_kv
from seqpar.parallel.sequence import IMPLS, chunk_indices, sequence_attention, shard_sequence

from .spawn import spawn

ATOL = 2e-5  # fp32, against SDPA on the whole sequence


def reference(q, k, v, causal, mask, docs=None):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    attn_mask = None
    if mask is not None:
        attn_mask = mask[:, None, None, :]
    if docs is not None:  # the explicit block-diagonal mask
        same = (docs[:, :, None] == docs[:, None, :])[:, None]
        attn_mask = same if attn_mask is None else attn_mask & same
    if causal and attn_mask is not None:
        attn_mask = attn_mask & torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()
    heads = q.shape[1]  # k and v repeated to the query heads (their gradients sum over each group)
    out = F.scaled_dot_product_attention(q, repeat_kv(k, heads), repeat_kv(v, heads), attn_mask=attn_mask,
                                         is_causal=causal and attn_mask is None)
    return out, q, k, v


def document_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """(B, T) ids of consecutive documents of the given lengths (each row's lengths sum to T)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_row])


def _documents(seq_len: int) -> torch.Tensor:
    """Odd document lengths: one row of short documents (many chunks without a shared document), one of a long
    document across chunk boundaries between short ones."""
    short, rest = [], seq_len
    while rest:
        short.append(min(rest, 3 if len(short) % 2 else 1))
        rest -= short[-1]
    long = [2, seq_len - 5, 3] if seq_len > 5 else [seq_len]
    return document_ids([short, long])


def _check_one(rank, world, impl, causal, padded, heads=None, kv_heads=None, documents=False, attn=None, ulysses=1):
    torch.manual_seed(0)
    seq_len = 2 * world * 5 if causal else world * 7  # not powers of two
    b, h, d = 2, heads or 2 * world, 8  # ulysses needs heads divisible by sp
    hk = kv_heads or h
    q, k, v = torch.randn(b, h, seq_len, d), torch.randn(b, hk, seq_len, d), torch.randn(b, hk, seq_len, d)
    dout = torch.randn(b, h, seq_len, d)
    mask = None
    if padded:
        mask = torch.ones(b, seq_len, dtype=torch.bool)
        mask[1, seq_len // 3 :] = False  # the last chunks of this sequence are all padding
        mask[0, -1] = False
    docs = _documents(seq_len) if documents else None
    out, rq, rk, rv = reference(q, k, v, causal, mask, docs)
    out.backward(dout)

    idx = chunk_indices(seq_len, world, rank, causal, ulysses)
    local = [shard_sequence(x, world, rank, causal, 2, ulysses).clone().requires_grad_() for x in (q, k, v)]
    inputs = local
    if padded:  # also the model's layout: (B, H, T, D) views of (B, T, H, D) memory
        local = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in local]
        inputs = [x.transpose(1, 2) for x in local]
    local_mask = shard_sequence(mask, world, rank, causal, 1, ulysses) if padded else None
    attn = attn or IMPLS[impl](dist.group.WORLD)
    local_docs = shard_sequence(docs, world, rank, causal, 1, ulysses) if documents else None
    y = attn(*inputs, causal=causal, key_padding_mask=local_mask, dropout_p=0.0, document_ids=local_docs)
    grad_out = dout[:, :, idx]
    if padded:  # the output gradient as a model passes it: a (B, H, T, D) view of (B, T, H, D) memory
        grad_out = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    y.backward(grad_out)
    rows = slice(None)
    if padded:  # padded queries are free to attend to anything; compare real ones
        rows = local_mask[:, None, :, None].expand_as(y)
    torch.testing.assert_close(y[rows], out.detach()[:, :, idx][rows], atol=ATOL, rtol=0)
    for name, mine, ref in zip("qkv", local, (rq, rk, rv), strict=True):
        grad = mine.grad.transpose(1, 2) if padded else mine.grad
        torch.testing.assert_close(grad, ref.grad[:, :, idx], atol=ATOL, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")


def _check_all(rank, world):
    from seqpar.parallel.sequence import ring

    default = ring.LEAN_MIN_BYTES
    # ring again: its memory-lean backward, also with 5 heads (head groups of 2, 2 and 1). Grouped-query attention
    # (kv heads): 2 key/value heads for 2 * sp query heads (fewer than sp for ulysses from sp = 3), and one.
    runs = [(impl, default, None, None) for impl in IMPLS] + [("ring", 0, None, None), ("ring", 0, 5, None)]
    runs += [(impl, default, None, 2) for impl in IMPLS] + [("ring", 0, None, 1), ("ring", 0, 10, 5),
                                                            ("ulysses", default, None, 1)]
    for impl, lean_min, heads, kv_heads in runs:
        ring.LEAN_MIN_BYTES = lean_min
        for causal in (False, True):
            for padded in (False, True):
                try:
                    _check_one(rank, world, impl, causal, padded, heads, kv_heads)
                except AssertionError as e:
                    raise AssertionError(f"{impl} (lean from {lean_min} B, heads {heads or 2 * world}, kv heads "
                                         f"{kv_heads}) sp={world} causal={causal} padded={padded}: {e}") from None
    ring.LEAN_MIN_BYTES = default


def _check_documents(rank, world):
    from seqpar.parallel.sequence import ring

    default, tile = ring.LEAN_MIN_BYTES, ring.DOCUMENT_TILE
    # every impl; ring also with its lean backward, tiles smaller than its chunks (2 tokens) and grouped-query
    # attention; with padding too
    runs = [(impl, default, tile, None, False) for impl in IMPLS] + [
        ("ring", 0, tile, None, False), ("ring", default, 2, None, False), ("ring", 0, 2, 2, True),
        ("rsa", default, tile, 2, True), ("ulysses", default, tile, 2, True)]
    for impl, lean_min, doc_tile, kv_heads, padded in runs:
        ring.LEAN_MIN_BYTES, ring.DOCUMENT_TILE = lean_min, doc_tile
        for causal in (True, False):
            try:
                _check_one(rank, world, impl, causal, padded, kv_heads=kv_heads, documents=True)
            except AssertionError as e:
                raise AssertionError(f"documents: {impl} (lean from {lean_min} B, tiles {doc_tile}, kv heads "
                                     f"{kv_heads}) sp={world} causal={causal} padded={padded}: {e}") from None
    ring.LEAN_MIN_BYTES, ring.DOCUMENT_TILE = default, tile


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sequence_parallel_attention_matches_sdpa(world):
    """ring, rsa and ulysses x causal/bidirectional x with/without padding, in one job per sp degree."""
    spawn(_check_all, world, timeout=240)


def _check_hybrid(rank, world):
    """sp = 4 as 2 Ulysses groups of 2 in a ring of 2, as one group of 4 (a ring of one) and as 4 groups of one."""
    for ulysses in (2, 4, 1):
        ring_size = world // ulysses
        groups = {}
        for u in range(ulysses):  # every rank creates every group, in the same order
            g = dist.new_group([j * ulysses + u for j in range(ring_size)])
            if rank % ulysses == u:
                groups["ring"] = g
        for j in range(ring_size):
            g = dist.new_group(list(range(j * ulysses, (j + 1) * ulysses)))
            if rank // ulysses == j:
                groups["ulysses"] = g
        attn = sequence_attention("hybrid", groups["ulysses"], groups["ring"])
        for kv_heads in (None, 2, 1):
            for causal in (False, True):
                for padded in (False, True):
                    try:
                        _check_one(rank, world, "hybrid", causal, padded, None, kv_heads, False, attn, ulysses)
                        _check_one(rank, world, "hybrid", causal, padded, None, kv_heads, True, attn, ulysses)
                    except AssertionError as e:
                        raise AssertionError(f"hybrid ulysses={ulysses} kv heads {kv_heads} causal={causal} "
                                             f"padded={padded}: {e}") from None


def test_two_level_sequence_parallel_attention_matches_sdpa():
    spawn(_check_hybrid, 4, timeout=240)


def test_hybrid_chunk_layout_gives_each_ulysses_group_a_ring_zigzag_pair():
    # sp = 4, ulysses = 2: ring chunks of 16 tokens are [0..3] [4..7] [8..11] [12..15] (2R = 4 of them, 4 tokens
    # each, halves of 2): group 0 (ranks 0, 1) holds ring chunks 0 and 3, group 1 (ranks 2, 3) chunks 1 and 2.
    assert chunk_indices(16, 4, 0, True, ulysses=2).tolist() == [0, 1, 12, 13]
    assert chunk_indices(16, 4, 1, True, ulysses=2).tolist() == [2, 3, 14, 15]
    assert chunk_indices(16, 4, 2, True, ulysses=2).tolist() == [4, 5, 8, 9]
    assert chunk_indices(16, 4, 3, True, ulysses=2).tolist() == [6, 7, 10, 11]
    assert chunk_indices(16, 4, 1, True, ulysses=1).tolist() == chunk_indices(16, 4, 1, True).tolist()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_document_masking_matches_block_diagonal_sdpa(world):
    """Every sp_impl with `document_ids` (odd document lengths, short ones and one across chunks) against SDPA with
    the block-diagonal mask on the whole sequence, forward and backward, causal and bidirectional."""
    spawn(_check_documents, world, timeout=240)


def test_sdpa_document_ids_equal_an_explicit_block_diagonal_mask():
    from seqpar.models.attention import sdpa_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 17, 8), torch.randn(2, 2, 17, 8), torch.randn(2, 2, 17, 8)
    docs = _documents(17)
    for causal in (True, False):
        want, *_ = reference(q, k, v, causal, None, docs)
        got = sdpa_attention(q, k, v, causal=causal, key_padding_mask=None, dropout_p=0.0, document_ids=docs)
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=0)


def test_chunk_layouts():
    assert chunk_indices(8, 2, 0, zigzag=False).tolist() == [0, 1, 2, 3]
    assert chunk_indices(8, 2, 0, zigzag=True).tolist() == [0, 1, 6, 7]
    assert chunk_indices(8, 2, 1, zigzag=True).tolist() == [2, 3, 4, 5]
    every = torch.cat([chunk_indices(24, 3, r, zigzag=True) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))
    with pytest.raises(ValueError, match="not divisible by 4"):
        chunk_indices(10, 2, 0, zigzag=True)
