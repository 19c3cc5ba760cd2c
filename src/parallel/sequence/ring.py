"""Ring attention (`parallel.sp_impl=ring`, the default): blockwise attention with an online softmax.

Each rank keeps its queries; key/value blocks travel around the ring (sp - 1 exchanges, each overlapped with the
current block's compute). Per block a fused kernel returns the block output and its log-sum-exp; blocks are merged
with the log-sum-exp, so no L x L or L/sp x L score matrix ever exists. Under zigzag a block is either the diagonal
one (causal kernel), one whose second half lies entirely after every local query (only the first half of the keys
is used) or one that only the second half of the local queries sees (only those queries are used): fully masked
work is skipped. Backward recomputes per block from the saved output and log-sum-exp; the key/value gradients
travel around the ring with their block and arrive home after sp exchanges.

Document masking (`document_ids`): every rank's chunk of document ids is all-gathered once per call (B x L ints),
and each block is cut into its zigzag chunk pairs and those into tiles of `DOCUMENT_TILE` queries and keys
(`document_pieces`): a tile pair whose queries and keys share no document (from the tiles' first and last ids: ids
grow along the sequence) is skipped, and one that does is trimmed to the queries and keys of the documents they
share before its kernel runs with a (B, 1, Tq, Tk) "same document" bias (none when one document fills it; tiles on
the diagonal keep the causal kernel). Skipped and trimmed work is compute only: the key/value
blocks still travel the whole ring. Which pairs remain depends on the data, so the zigzag balance holds for the work
causality leaves, and documents shorter than a chunk remove most of it on every rank alike.

Grouped-query attention: keys and values travel with their own H_kv heads, (B, H_kv, c, D), and are expanded to
the query heads only inside a block's kernel call (`kernels.block_forward`), so a ring step moves H / H_kv times
fewer bytes than with a key/value head per query head; their gradient accumulators are H_kv heads too.

Communication: forward, sp - 1 ring exchanges of the (k, v) chunk plus one all-gather of the padding masks;
backward, sp - 1 exchanges of (k, v) and sp exchanges of their fp32 gradient accumulators.

Memory: no zero-filled or stacked buffers: the own block's output starts the accumulators, k and v travel as they
are. For chunks of 1 MiB and more (`LEAN_MIN_BYTES`) backward trades latency for memory (`_lean_backward`): blocks
are computed a head group at a time, from three ranks on keys and values travel a head group at a time, each group
let go once sent (about a group beside the block in use, not a second block in flight), and the gradient
accumulators travel one at a time, each exchange waited for (a spare of one chunk, not four). On CPU the output
gradient is used in the layout it comes in (no contiguous copy).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.parallel.comm import RingExchange, all_gather_list
from seqpar.parallel.sequence.kernels import (
    block_backward,
    block_forward,
    block_kernel,
    key_bias,
    merge_into,
)

# A piece of a block: (query slice, key slice, causal kernel?, additive bias or None, queries without any key or
# None): what one kernel call computes.
Piece = tuple[slice, slice, bool, torch.Tensor | None, torch.Tensor | None]


# ------------------------------------------------------------------------------------------ ring attention
def _block_slices(rank: int, src: int, causal: bool, t: int):
    """(query slice, key slice, causal kernel?) for the block of rank `src` seen from `rank`; zigzag if causal."""
    full, half = slice(0, t), t // 2
    if not causal:
        return full, full, False
    if src == rank:
        return full, full, True
    if src < rank:  # its later chunk lies after all our queries: keys' first half only
        return full, slice(0, half), False
    return slice(half, t), full, False  # its chunks lie after our early chunk: our later half only


def _chunk_pairs(rank: int, src: int, causal: bool, t: int) -> list[tuple[slice, slice, bool]]:
    """The block of `src` seen from `rank` as (query chunk, key chunk, causal kernel?) pairs: `_block_slices`'s
    block cut at the zigzag chunk boundary (one pair for bidirectional attention)."""
    if not causal:
        return [(slice(0, t), slice(0, t), False)]
    first, second = slice(0, t // 2), slice(t // 2, t)
    if src == rank:
        return [(first, first, True), (second, first, False), (second, second, True)]
    if src < rank:
        return [(first, first, False), (second, first, False)]
    return [(second, first, False), (second, second, False)]


def _tiles(part: slice, tile: int) -> list[slice]:
    return [slice(i, min(i + tile, part.stop)) for i in range(part.start, part.stop, tile)]


def _tile_pairs(qs: slice, ks: slice, diagonal: bool, tile: int) -> list[tuple[slice, slice, bool]]:
    """A chunk pair cut into tiles of `tile` queries and keys; of a diagonal (causal) pair only the tiles on and
    below the diagonal, those on it causal."""
    if not diagonal:
        return [(qt, kt, False) for qt in _tiles(qs, tile) for kt in _tiles(ks, tile)]
    tiles = _tiles(qs, tile)
    return [(qt, kt, i == j) for i, qt in enumerate(tiles) for j, kt in enumerate(tiles[: i + 1])]


def _shared(q_ids: torch.Tensor, k_ids: torch.Tensor, qs: slice, ks: slice) -> tuple[slice, slice] | None:
    """The query and key slices of the documents that the queries `q_ids[:, qs]` and the keys `k_ids[:, ks]` (rows
    of ids that never decrease) have in common, in any batch row; None when they share none."""
    q, k = q_ids[:, qs], k_ids[:, ks]
    lo = torch.maximum(q[:, 0], k[:, 0])  # (B,) the documents both hold: lo ... hi
    hi = torch.minimum(q[:, -1], k[:, -1])
    rows = lo <= hi
    if not bool(rows.any()):
        return None
    lo, hi = lo[rows, None], hi[rows, None]
    q_lo, q_hi = torch.searchsorted(q[rows], lo), torch.searchsorted(q[rows], hi, right=True)
    k_lo, k_hi = torch.searchsorted(k[rows], lo), torch.searchsorted(k[rows], hi, right=True)
    return (slice(qs.start + int(q_lo.min()), qs.start + int(q_hi.max())),
            slice(ks.start + int(k_lo.min()), ks.start + int(k_hi.max())))


# With document masking a chunk pair is computed in tiles of this many queries and keys, so that the work skipped
# follows the documents more closely than whole chunks (fewer masked pairs computed) for a few more kernel calls.
DOCUMENT_TILE = 512


def document_pieces(rank: int, src: int, causal: bool, doc_ids: list[torch.Tensor],
                    tile: int | None = None) -> list[tuple[slice, slice, bool]]:
    """(query slice, key slice, causal kernel?) of the kernel calls that block `src` needs at `rank` with document
    masking, given every rank's (B, t) chunk of document ids (`doc_ids`, zigzag order when causal): the block's
    chunk pairs (`_chunk_pairs`) cut into tiles of `tile` (`DOCUMENT_TILE`) queries and keys, those that share a
    document, each trimmed to the documents they share (a diagonal tile stays whole, its queries and keys being the
    same tokens)."""
    t = doc_ids[rank].shape[-1]
    pieces = []
    for chunk_q, chunk_k, diagonal in _chunk_pairs(rank, src, causal, t):
        for qs, ks, on_diagonal in _tile_pairs(chunk_q, chunk_k, diagonal, tile or DOCUMENT_TILE):
            shared = _shared(doc_ids[rank], doc_ids[src], qs, ks)
            if shared is not None:
                pieces.append((qs, ks, True) if on_diagonal else (*shared, False))
    return pieces


def _pieces(r: int, src: int, causal: bool, t: int, masks, docs, dtype) -> list[Piece]:
    """The kernel calls of block `src` at rank `r`: without documents the one of `_block_slices` with its padding
    bias; with documents (`docs`: every rank's ids, on the host) `document_pieces` with their "same document" bias
    (and padding) unless all their queries and keys are of one document, and the queries that have no key."""
    if docs is None:
        qs, ks, blk_causal = _block_slices(r, src, causal, t)
        m = masks[src][:, ks] if masks[src] is not None else None
        empty = ~m.any(-1)[:, None, None] if m is not None else None  # a batch row without any key
        return [(qs, ks, blk_causal, key_bias(m, dtype), empty)]
    out = []
    for qs, ks, blk_causal in document_pieces(r, src, causal, docs.ids):
        q_ids, k_ids = docs.ids[r][:, qs], docs.ids[src][:, ks]
        if masks[src] is None and bool((q_ids[:, 0] == k_ids[:, -1]).all() and (q_ids[:, -1] == k_ids[:, 0]).all()):
            out.append((qs, ks, blk_causal, None, None))  # one document throughout: no mask to apply
            continue
        allowed = (docs.local[r][:, qs, None] == docs.local[src][:, None, ks])[:, None]  # (B, 1, Tq, Tk)
        if masks[src] is not None:
            allowed = allowed & masks[src][:, None, None, ks]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=docs.device).masked_fill_(~allowed, float("-inf"))
        out.append((qs, ks, blk_causal, bias, ~allowed.any(-1)))
    return out


class _Documents:
    """Every rank's chunk of document ids: `local` where attention runs, `ids` on the host for the plan."""

    def __init__(self, doc_ids: torch.Tensor, group):
        self.local = all_gather_list(doc_ids, group)
        self.ids = [x.cpu() for x in self.local]
        self.device = doc_ids.device


def _whole(pieces: list[Piece], t: int) -> bool:
    """Whether a block is one kernel call over every local query and key (the own block without documents)."""
    return len(pieces) == 1 and pieces[0][0] == slice(0, t) and pieces[0][1] == slice(0, t)


# ------------------------------------------------------------------------------------------ ring attention
GRAD_HEAD_GROUPS = 4  # a block's gradients are computed this many head groups at a time (see `_head_groups`)
# From this size of a rank's key chunk on, backward saves memory over latency (`_lean_backward`: head groups, keys
# and values travelling a group at a time, the gradient accumulators one at a time). Below it the memory is small and
# the exchanges' latency is not (`_backward`: one kernel call and one exchange per block, the accumulators travelling
# together while the next block computes). See docs/benchmarks.md for what each costs.
LEAN_MIN_BYTES = 1 * 2**20


def _head_groups(kv_heads: int, heads: int) -> list[tuple[slice, slice]]:
    """(key/value heads, their query heads) of each head group for the lean backward: the kernel's dq/dk/dv
    temporaries are a group's, not the block's, and keys and values travel a group at a time."""
    size, rep = -(-kv_heads // GRAD_HEAD_GROUPS), heads // kv_heads
    return [(slice(h, min(h + size, kv_heads)), slice(h * rep, min(h + size, kv_heads) * rep))
            for h in range(0, kv_heads, size)]


def _accumulators(blk_out: torch.Tensor, blk_lse: torch.Tensor, empty: torch.Tensor | None):
    """The own (diagonal) block's output and log-sum-exp as the fp32 running accumulators, with 0 output where a
    query has no attendable key (kernels leave anything there)."""
    out = blk_out.float()
    if empty is not None:
        out.masked_fill_(torch.isinf(blk_lse)[..., None], 0.0)
    return out, blk_lse.float()


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, doc_ids, causal: bool, group):
        ring = RingExchange(group, tag=0)
        n, r = ring.size, ring.rank
        masks = all_gather_list(key_mask, group) if key_mask is not None else [None] * n
        docs = _Documents(doc_ids, group) if doc_ids is not None else None
        t = q.shape[-2]
        out = lse = None
        kb, vb = k, v
        for i in range(n):
            src = (r - i) % n
            if i < n - 1:
                ring.start(kb, vb)  # next block in flight while this one computes
            pieces = _pieces(r, src, causal, t, masks, docs, q.dtype)
            if out is None and not _whole(pieces, t):  # documents: pieces cover part of the queries
                out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
                lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
            for qs, ks, blk_causal, bias, empty in pieces:
                blk_out, blk_lse = block_forward(q[:, :, qs], kb[:, :, ks], vb[:, :, ks], blk_causal, bias)
                if empty is not None:  # queries without a key in this piece: -inf (kernels report 0)
                    blk_lse = blk_lse.masked_fill(empty, float("-inf"))
                if out is None:  # our own block covers every local query and key
                    out, lse = _accumulators(blk_out, blk_lse, empty)
                else:
                    merge_into(out[:, :, qs], lse[:, :, qs], blk_out, blk_lse)
                del blk_out, blk_lse
            if i < n - 1:
                kb, vb = ring.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.masks, ctx.docs, ctx.causal, ctx.group = masks, docs, causal, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        masks, docs, causal, group = ctx.masks, ctx.docs, ctx.causal, ctx.group
        if masks[0] is not None or docs is not None:  # a query with no key at all (-inf): its probabilities stay 0
            lse = torch.where(torch.isinf(lse), 0.0, lse)
        if block_kernel(q, None) != "cpu":  # CUDA's kernels get a dense output gradient (one expanded from a
            dout = dout.contiguous()  # .sum() is not); the CPU kernel reads any strides, so no copy there
        backward = _lean_backward if k.numel() * k.element_size() >= LEAN_MIN_BYTES else _backward
        dq, dk, dv = backward(dout, q, k, v, out, lse, masks, docs, causal, group)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _add_grads(acc, qs: slice, ks: slice, g, hq: slice = slice(None), h: slice = slice(None)) -> None:
    """Add a kernel call's (dq, dk, dv) for queries `qs` and keys `ks` (of heads `hq` and `h`) to the fp32
    accumulators `acc`."""
    acc[0][:, hq, qs] += g[0]
    acc[1][:, h, ks] += g[1]
    acc[2][:, h, ks] += g[2]


def _backward(dout, q, k, v, out, lse, masks, docs, causal, group):
    """Backward for small chunks: one kernel call per block (per piece with documents); the next key/value block
    and the previous block's gradient accumulators are in flight while a block computes."""
    kv_ring, dkv_ring = RingExchange(group, tag=0), RingExchange(group, tag=1)
    n, r = kv_ring.size, kv_ring.rank
    t = q.shape[-2]
    kb, vb = k, v
    for i in range(n):
        src = (r - i) % n
        if i < n - 1:
            kv_ring.start(kb, vb)
        pieces = _pieces(r, src, causal, t, masks, docs, q.dtype)
        grads = [(qs, ks, block_backward(dout[:, :, qs], q[:, :, qs], kb[:, :, ks], vb[:, :, ks], out[:, :, qs],
                                         lse[:, :, qs].contiguous(), blk_causal, bias))
                 for qs, ks, blk_causal, bias, _ in pieces]
        if i == 0 and _whole(pieces, t):  # our own block: its gradients become the fp32 accumulators
            dq, dk, dv = (x.float() for x in grads[0][2])
        else:
            if i == 0:  # documents: the pieces cover part of the queries and keys
                dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
            else:
                dk, dv = dkv_ring.wait()  # block `src`'s accumulators, in flight during this compute
            for qs, ks, g in grads:
                _add_grads((dq, dk, dv), qs, ks, g)
        del grads
        if n > 1:
            dkv_ring.start(dk, dv)  # on to the next rank with the block they belong to
            del dk, dv
        if i < n - 1:
            kb, vb = kv_ring.wait()
    if n > 1:
        dk, dv = dkv_ring.wait()  # after n exchanges our own block's gradients are home
    return dq, dk, dv


def _lean_backward(dout, q, k, v, out, lse, masks, docs, causal, group):
    """Backward for large chunks, memory over latency. A remote block is computed a head group at a time (the
    kernel's temporaries are a group's), and from three ranks on keys and values travel a head group at a time:
    while group j computes, group j goes on to the next rank and the previous rank's group j comes in, and a group
    is let go once sent, so beside the block in use about one group more is alive, not a whole second block. With
    two ranks our block is the only one to travel and the one received goes no further: it travels whole (no
    copies) while ours computes in one kernel call. The gradient accumulators travel after each block, dk then dv,
    each waited for (one spare chunk, not four)."""
    kv_ring, dkv_ring = RingExchange(group, tag=0), RingExchange(group, tag=1)
    n, r = kv_ring.size, kv_ring.rank
    t = q.shape[-2]
    groups = _head_groups(k.shape[1], q.shape[1])
    block = [(k[:, h], v[:, h]) for h, _ in groups]  # our own block's groups are views; they go out as dense copies
    dq = dk = dv = None
    for i in range(n):
        src = (r - i) % n
        pieces = _pieces(r, src, causal, t, masks, docs, q.dtype)
        whole = i == 0 and _whole(pieces, t)  # our own block, one kernel call over all: assigned, not added
        if i == 0 and n == 2:  # our block's gradients become the fp32 accumulators (no zero-filled buffers)
            kv_ring.start(k, v)
            if whole:
                (_, _, blk_causal, bias, _), = pieces
                dq, dk, dv = (x.float() for x in block_backward(dout, q, k, v, out, lse, blk_causal, bias))
            else:
                dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
                for qs, ks, blk_causal, bias, _ in pieces:
                    _add_grads((dq, dk, dv), qs, ks, block_backward(
                        dout[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs],
                        lse[:, :, qs].contiguous(), blk_causal, bias))
            kb, vb = kv_ring.wait()
            block = [(kb[:, h], vb[:, h]) for h, _ in groups]
            del kb, vb
        else:
            if dq is None:  # x's strides, so the gradients return without a copy
                make = torch.empty_like if whole else torch.zeros_like
                dq, dk, dv = (make(x, dtype=torch.float32) for x in (q, k, v))
            arrived = []
            for j, (h, hq) in enumerate(groups):
                kg, vg = block[j]
                block[j] = None  # alive only until sent
                if i < n - 1:
                    if j:
                        arrived.append(kv_ring.wait())  # the previous group has gone on and the next block's came
                    kv_ring.start(kg, vg)
                for qs, ks, blk_causal, bias, _ in pieces:
                    g = block_backward(dout[:, hq, qs], q[:, hq, qs], kg[:, :, ks], vg[:, :, ks], out[:, hq, qs],
                                       lse[:, hq, qs].contiguous(), blk_causal, bias)
                    if whole:  # our own block covers every local query and key
                        dq[:, hq], dk[:, h], dv[:, h] = g
                    else:
                        _add_grads((dq, dk, dv), qs, ks, g, hq, h)
                    del g
                del kg, vg
            if i < n - 1:
                block = [*arrived, kv_ring.wait()]
        if n > 1:
            # On to the next rank with the block they belong to; the previous rank's come in (after n exchanges our
            # own block's are home).
            (dk,) = dkv_ring.start(dk).wait()
            (dv,) = dkv_ring.start(dv).wait()
    return dq, dk, dv


class RingAttention:
    """A core-attention function (see `seqpar.models.attention`) that runs ring attention over `group`.

    Inputs are this rank's chunk: contiguous for bidirectional attention, zigzag for causal attention.
    """

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def __call__(self, q, k, v, *, causal: bool, key_padding_mask: torch.Tensor | None, dropout_p: float,
                 document_ids: torch.Tensor | None = None):
        if dropout_p:
            raise ValueError("ring attention has no attention dropout; set model.attn_dropout=0")
        if causal and q.shape[-2] % 2:
            raise ValueError(f"causal ring attention needs an even local length (zigzag halves), got {q.shape[-2]}")
        mask = key_padding_mask.bool() if key_padding_mask is not None else None
        return _RingAttentionFn.apply(q, k, v, mask, document_ids, causal, self.group)
