"""What ring attention computes of each block: the query and key slices of its kernel calls.

A block is the key/value chunk of rank `src` as rank `rank` sees it. Without documents it is one kernel call
(`block_slices`): bidirectional attention uses every query and key; under zigzag (causal) the own block is the
diagonal one (causal kernel), an earlier rank's block only its first half of keys (its second chunk lies after every
local query) and a later rank's block only the local queries' second half. With document masking (`document_pieces`)
a block is cut into its zigzag chunk pairs (`chunk_pairs`) and those into tiles of `DOCUMENT_TILE` queries and keys:
a tile pair whose queries and keys share no document (`models.documents.shared_documents`) is skipped, and one that
does is trimmed to the queries and keys of the documents they share;
`block_pieces` adds each call's additive bias (padding, "same document") and the queries left without a key.
`head_groups` splits a block's heads for the memory-lean backward.

Nothing here communicates except `DocumentIds`, which gathers every rank's document ids once per call.
"""

from __future__ import annotations

import torch

from seqpar.models.documents import DOCUMENT_TILE, one_document, shared_documents, tiles
from seqpar.parallel.comm import all_gather_list
from seqpar.parallel.sequence.kernels import key_bias

# A piece of a block: (query slice, key slice, causal kernel?, additive bias or None, queries without any key or
# None): what one kernel call computes.
Piece = tuple[slice, slice, bool, torch.Tensor | None, torch.Tensor | None]


def block_slices(rank: int, src: int, causal: bool, t: int):
    """(query slice, key slice, causal kernel?) for the block of rank `src` seen from `rank`; zigzag if causal."""
    full, half = slice(0, t), t // 2
    if not causal:
        return full, full, False
    if src == rank:
        return full, full, True
    if src < rank:  # its later chunk lies after all our queries: keys' first half only
        return full, slice(0, half), False
    return slice(half, t), full, False  # its chunks lie after our early chunk: our later half only


def chunk_pairs(rank: int, src: int, causal: bool, t: int) -> list[tuple[slice, slice, bool]]:
    """The block of `src` seen from `rank` as (query chunk, key chunk, causal kernel?) pairs: `block_slices`'s
    block cut at the zigzag chunk boundary (one pair for bidirectional attention)."""
    if not causal:
        return [(slice(0, t), slice(0, t), False)]
    first, second = slice(0, t // 2), slice(t // 2, t)
    if src == rank:
        return [(first, first, True), (second, first, False), (second, second, True)]
    if src < rank:
        return [(first, first, False), (second, first, False)]
    return [(second, first, False), (second, second, False)]


def _tile_pairs(qs: slice, ks: slice, diagonal: bool, tile: int) -> list[tuple[slice, slice, bool]]:
    """A chunk pair cut into tiles of `tile` queries and keys; of a diagonal (causal) pair only the tiles on and
    below the diagonal, those on it causal."""
    if not diagonal:
        return [(qt, kt, False) for qt in tiles(qs, tile) for kt in tiles(ks, tile)]
    cut = tiles(qs, tile)
    return [(qt, kt, i == j) for i, qt in enumerate(cut) for j, kt in enumerate(cut[: i + 1])]


def document_pieces(rank: int, src: int, causal: bool, doc_ids: list[torch.Tensor],
                    tile: int | None = None) -> list[tuple[slice, slice, bool]]:
    """(query slice, key slice, causal kernel?) of the kernel calls that block `src` needs at `rank` with document
    masking, given every rank's (B, t) chunk of document ids (`doc_ids`, zigzag order when causal): the block's
    chunk pairs (`chunk_pairs`) cut into tiles of `tile` (`DOCUMENT_TILE`) queries and keys, those that share a
    document, each trimmed to the documents they share (a diagonal tile stays whole, its queries and keys being the
    same tokens)."""
    t = doc_ids[rank].shape[-1]
    pieces = []
    for chunk_q, chunk_k, diagonal in chunk_pairs(rank, src, causal, t):
        for qs, ks, on_diagonal in _tile_pairs(chunk_q, chunk_k, diagonal, tile or DOCUMENT_TILE):
            shared = shared_documents(doc_ids[rank], doc_ids[src], qs, ks)
            if shared is not None:
                pieces.append((qs, ks, True) if on_diagonal else (*shared, False))
    return pieces


class DocumentIds:
    """Every rank's chunk of document ids: `local` where attention runs, `ids` on the host for the plan; `tile`: the
    tile size of `document_pieces`, fixed for the call (forward and backward cut blocks alike)."""

    def __init__(self, doc_ids: torch.Tensor, group, tile: int):
        self.local = all_gather_list(doc_ids, group)
        self.ids = [x.cpu() for x in self.local]
        self.device = doc_ids.device
        self.tile = tile


def block_pieces(r: int, src: int, causal: bool, t: int, masks, docs, dtype) -> list[Piece]:
    """The kernel calls of block `src` at rank `r`: without documents the one of `block_slices` with its padding
    bias; with documents (`docs`: every rank's ids) `document_pieces` with their "same document" bias
    (and padding) unless all their queries and keys are of one document, and the queries that have no key."""
    if docs is None:
        qs, ks, blk_causal = block_slices(r, src, causal, t)
        m = masks[src][:, ks] if masks[src] is not None else None
        empty = ~m.any(-1)[:, None, None] if m is not None else None  # a batch row without any key
        return [(qs, ks, blk_causal, key_bias(m, dtype), empty)]
    out = []
    for qs, ks, blk_causal in document_pieces(r, src, causal, docs.ids, docs.tile):
        q_ids, k_ids = docs.ids[r][:, qs], docs.ids[src][:, ks]
        if masks[src] is None and one_document(q_ids, k_ids):
            out.append((qs, ks, blk_causal, None, None))  # one document throughout: no mask to apply
            continue
        allowed = (docs.local[r][:, qs, None] == docs.local[src][:, None, ks])[:, None]  # (B, 1, Tq, Tk)
        if masks[src] is not None:
            allowed = allowed & masks[src][:, None, None, ks]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=docs.device).masked_fill_(~allowed, float("-inf"))
        out.append((qs, ks, blk_causal, bias, ~allowed.any(-1)))
    return out


def covers_block(pieces: list[Piece], t: int) -> bool:
    """Whether a block is one kernel call over every local query and key (the own block without documents)."""
    return len(pieces) == 1 and pieces[0][0] == slice(0, t) and pieces[0][1] == slice(0, t)


GRAD_HEAD_GROUPS = 4  # a block's gradients are computed this many head groups at a time (see `head_groups`)


def head_groups(kv_heads: int, heads: int) -> list[tuple[slice, slice]]:
    """(key/value heads, their query heads) of each head group for the lean backward: the kernel's dq/dk/dv
    temporaries are a group's, not the block's, and keys and values travel a group at a time."""
    size, rep = -(-kv_heads // GRAD_HEAD_GROUPS), heads // kv_heads
    return [(slice(h, min(h + size, kv_heads)), slice(h * rep, min(h + size, kv_heads) * rep))
            for h in range(0, kv_heads, size)]
