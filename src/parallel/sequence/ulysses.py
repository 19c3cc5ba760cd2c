"""Ulysses attention (`parallel.sp_impl=ulysses`): trade sequence sharding for head sharding and back.

An all-to-all turns this rank's (B, H, L/n, D) chunk of q, k and v into (B, H/n, L, D): the whole sequence for
H/n of the heads. Attention then runs locally with the fused single-device kernel, and a second all-to-all returns
the output to sequence sharding. Communication: forward three all-to-alls in (q, k, v, stacked) and one out;
backward the mirror images (`seqpar.parallel.comm.seq_to_heads`), plus one all-gather of the padding masks (and
one of the document ids with document masking: the whole sequence's block-diagonal mask, as on one process).
Needs the (local) head count divisible by sp.

Grouped-query attention: key/value heads go to the ranks of their query heads. When sp does not divide the H_kv
key/value heads (fewer heads than ranks, as LoongTrain handles it), each is first repeated to lcm(H_kv, sp) heads,
so every rank receives whole key/value heads for its query heads: k and v then move lcm(H_kv, sp) / H_kv times
their size (at most sp heads each; the repeats' gradients are summed back by autograd). Under the zigzag layout the gathered sequence is put back in
natural order before the causal kernel runs, and returned to zigzag order after.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from seqpar.models.attention import repeat_kv, sdpa_attention
from seqpar.parallel.comm import all_gather_list, heads_to_seq, seq_to_heads
from seqpar.parallel.sequence.chunks import chunk_indices


class UlyssesAttention:
    def __init__(self, group):
        self.group = group

    def __call__(self, q, k, v, *, causal: bool, key_padding_mask: torch.Tensor | None, dropout_p: float,
                 document_ids: torch.Tensor | None = None):
        n = dist.get_world_size(self.group)
        c = q.shape[2]
        q, k, v, mask, docs = to_heads(q, k, v, key_padding_mask, document_ids, self.group)
        order = None
        if causal:  # gathered rank order -> natural order of positions
            order = torch.cat([chunk_indices(n * c, n, j, zigzag=True) for j in range(n)]).to(q.device)
            q, k, v = (x[..., order.argsort(), :] for x in (q, k, v))
            mask = mask[:, order.argsort()] if mask is not None else None
            docs = docs[:, order.argsort()] if docs is not None else None
        y = sdpa_attention(q, k, v, causal=causal, key_padding_mask=mask, dropout_p=dropout_p, document_ids=docs)
        if order is not None:
            y = y[..., order, :]
        return heads_to_seq(y.contiguous(), self.group)


def to_heads(q, k, v, key_padding_mask, document_ids, group):
    """This rank's (B, H, c, D) chunks of q, k, v (k, v: H_kv heads) -> the group's n chunks in rank order,
    (B, H/n, n*c, D), for this rank's heads (key/value heads repeated first where n does not divide them), and
    the padding mask and document ids of those n chunks."""
    n = dist.get_world_size(group)
    b, h, c, d = q.shape
    if h % n:
        raise ValueError(f"ulysses needs the head count ({h} on this rank) divisible by its group ({n})")
    hk = sent_kv_heads(k.shape[1], n)
    k, v = repeat_kv(k, hk), repeat_kv(v, hk)
    # Head group j of q, k and v goes to rank j in one all-to-all: order the heads (group, q/k/v, head).
    qkv = torch.cat([x.reshape(b, n, x.shape[1] // n, c, d) for x in (q, k, v)], dim=2).view(b, -1, c, d)
    qkv = seq_to_heads(qkv, group)  # whole sequence, our heads: h/n query heads, then hk/n keys and values
    q, k, v = qkv.split([h // n, hk // n, hk // n], dim=1)
    mask = None
    if key_padding_mask is not None:
        mask = torch.cat(all_gather_list(key_padding_mask.bool(), group), dim=1)  # rank order
    docs = torch.cat(all_gather_list(document_ids, group), dim=1) if document_ids is not None else None
    return q, k, v, mask, docs


def sent_kv_heads(kv_heads: int, sp: int) -> int:
    """Key/value heads ulysses sends: H_kv when sp divides them, else each repeated to lcm(H_kv, sp) heads."""
    return math.lcm(kv_heads, sp)
