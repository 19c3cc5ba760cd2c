"""Packed documents cut into tiles: which queries and keys of document-masked attention can meet.

Document ids (B, T) never decrease along a row (`PackedSequences` numbers a window's documents in order; a sequence-
parallel chunk is a run of them), so a document is a contiguous run of equal ids and the documents of a run of
tokens are the ids from its first to its last. Attention with documents is computed in tiles of `DOCUMENT_TILE`
queries (and, in ring attention, keys): `tiles` cuts a range, `shared_documents` trims a (query tile, key range)
pair to the tokens of the documents both hold (None when they hold none), `one_document` says when a pair needs no
document mask at all. Single-device attention (`models.attention.document_attention`) and ring attention
(`parallel.sequence.ring_blocks`) both cut their work with these.
"""

from __future__ import annotations

import torch

# Document-masked attention is computed in tiles of this many queries (and keys, in ring attention): the work and
# the masks follow the documents more closely than whole sequences or chunks do, for a few more kernel calls.
DOCUMENT_TILE = 512


def tiles(part: slice, tile: int) -> list[slice]:
    """`part` cut into consecutive slices of `tile` (the last one shorter)."""
    return [slice(i, min(i + tile, part.stop)) for i in range(part.start, part.stop, tile)]


def shared_documents(q_ids: torch.Tensor, k_ids: torch.Tensor, qs: slice, ks: slice) -> tuple[slice, slice] | None:
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


def one_document(q_ids: torch.Tensor, k_ids: torch.Tensor) -> bool:
    """Whether, in every row, the queries' ids (B, Tq) and the keys' ids (B, Tk) are all of one document (the
    same-document mask is then all True)."""
    return bool((q_ids[:, 0] == k_ids[:, -1]).all() and (q_ids[:, -1] == k_ids[:, 0]).all())
