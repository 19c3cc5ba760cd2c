"""Two-level sequence parallelism (`parallel.sp_impl=hybrid`, `parallel.ulysses=U`): Ulysses inside groups of U
ranks, ring attention across the sp / U groups (USP; Megatron's `a2a+p2p`).

An all-to-all inside the Ulysses group (its ranks are adjacent, so a node's GPUs) turns each rank's chunk of q, k
and v into its H/U heads of the group's U chunks; ring attention then runs over the sp / U groups with those
larger chunks, and a second all-to-all returns the output to sequence sharding. sp is no longer capped by the head
count (only U must divide it), and the ring, whose exchanges cross the slower links, has sp / U steps instead of
sp.

The chunk layout (`chunks.chunk_indices` with `ulysses`): for causal models the sequence is cut into 2R zigzag ring
chunks (R = sp / U) and rank j*U+u holds the u-th part of ring chunks j and 2R-1-j, so that after the all-to-all the
group holds exactly ring chunk pair j, in the order ring attention expects once each rank's two halves are put
side by side.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.parallel.comm import heads_to_seq
from seqpar.parallel.sequence.ring import RingAttention
from seqpar.parallel.sequence.ulysses import to_heads


class HybridAttention:
    def __init__(self, ulysses_group, ring_group):
        self.ulysses_group = ulysses_group
        self.ring = RingAttention(ring_group)

    def __call__(self, q, k, v, *, causal: bool, key_padding_mask: torch.Tensor | None, dropout_p: float,
                 document_ids: torch.Tensor | None = None):
        u, c = dist.get_world_size(self.ulysses_group), q.shape[2]
        q, k, v, mask, docs = to_heads(q, k, v, key_padding_mask, document_ids, self.ulysses_group)
        order = None
        if causal:  # rank order [a_0 b_0 a_1 b_1 ...] -> the ring's zigzag pair [a_0 a_1 ... b_0 b_1 ...]
            half = c // 2
            order = torch.cat([torch.arange(j * c, j * c + half) for j in range(u)]
                              + [torch.arange(j * c + half, (j + 1) * c) for j in range(u)]).to(q.device)
            q, k, v = (x[..., order, :] for x in (q, k, v))
            mask = mask[:, order] if mask is not None else None
            docs = docs[:, order] if docs is not None else None
        y = self.ring(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal, key_padding_mask=mask,
                      dropout_p=dropout_p, document_ids=docs)
        if order is not None:
            y = y[..., order.argsort(), :]
        return heads_to_seq(y.contiguous(), self.ulysses_group)
