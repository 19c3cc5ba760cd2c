"""Ring attention (`parallel.sp_impl=ring`, the default): blockwise attention with an online softmax.

Each rank keeps its queries; key/value blocks travel around the ring (sp - 1 exchanges, each overlapped with the
current block's compute). Per block a fused kernel returns the block output and its log-sum-exp; blocks are merged
with the log-sum-exp, so no L x L or L/sp x L score matrix ever exists. Under zigzag a block is either the diagonal
one (causal kernel), one whose second half lies entirely after every local query (only the first half of the keys
is used) or one that only the second half of the local queries sees (only those queries are used): fully masked
work is skipped. Backward recomputes per block from the saved output and log-sum-exp; the key/value gradients
travel around the ring with their block and arrive home after sp exchanges.

Which queries and keys each block's kernel calls cover is `ring_blocks`' (the zigzag block slices, document
masking's tiles, the head groups); this module runs them: the autograd function, its exchanges and its merges.

Document masking (`document_ids`): every rank's chunk of document ids is all-gathered once per call (B x L ints),
and each block becomes the tiles of `DOCUMENT_TILE` queries and keys that share a document, trimmed to the documents
they share (`ring_blocks.document_pieces`), each run with a (B, 1, Tq, Tk) "same document" bias (none when one
document fills it; tiles on the diagonal keep the causal kernel). Skipped and trimmed work is compute only: the
key/value blocks still travel the whole ring. Which pairs remain depends on the data, so the zigzag balance holds
for the work causality leaves, and documents shorter than a chunk remove most of it on every rank alike.

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
from seqpar.parallel.sequence.kernels import block_backward, block_forward, block_kernel, merge_into
from seqpar.parallel.sequence.ring_blocks import (
    DOCUMENT_TILE,
    DocumentIds,
    block_pieces,
    covers_block,
    head_groups,
)

# From this size of a rank's key chunk on, backward saves memory over latency (`_lean_backward`: head groups, keys
# and values travelling a group at a time, the gradient accumulators one at a time). Below it the memory is small and
# the exchanges' latency is not (`_backward`: one kernel call and one exchange per block, the accumulators travelling
# together while the next block computes). See docs/benchmarks.md for what each costs.
LEAN_MIN_BYTES = 1 * 2**20


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
        # The tile size is read here, at each call: `ring.DOCUMENT_TILE` sets it for ring attention.
        docs = DocumentIds(doc_ids, group, DOCUMENT_TILE) if doc_ids is not None else None
        t = q.shape[-2]
        out = lse = None
        kb, vb = k, v
        for i in range(n):
            src = (r - i) % n
            if i < n - 1:
                ring.start(kb, vb)  # next block in flight while this one computes
            pieces = block_pieces(r, src, causal, t, masks, docs, q.dtype)
            if out is None and not covers_block(pieces, t):  # documents: pieces cover part of the queries
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
        pieces = block_pieces(r, src, causal, t, masks, docs, q.dtype)
        grads = [(qs, ks, block_backward(dout[:, :, qs], q[:, :, qs], kb[:, :, ks], vb[:, :, ks], out[:, :, qs],
                                         lse[:, :, qs].contiguous(), blk_causal, bias))
                 for qs, ks, blk_causal, bias, _ in pieces]
        if i == 0 and covers_block(pieces, t):  # our own block: its gradients become the fp32 accumulators
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
    groups = head_groups(k.shape[1], q.shape[1])
    block = [(k[:, h], v[:, h]) for h, _ in groups]  # our own block's groups are views; they go out as dense copies
    dq = dk = dv = None
    for i in range(n):
        src = (r - i) % n
        pieces = block_pieces(r, src, causal, t, masks, docs, q.dtype)
        whole = i == 0 and covers_block(pieces, t)  # our own block, one kernel call over all: assigned, not added
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
