"""Ring Self-Attention (`parallel.sp_impl=rsa`), as in Li et al., "Sequence Parallelism: Long Sequence Training
from System Perspective": the reference implementation and the baseline the others are measured against.

Forward on rank r of n, holding queries, keys and values of one chunk (c = L/n tokens):
1. ring-pass the keys: S[:, :, :, chunk j] = Q_r K_j^T / sqrt(D) for every j, i.e. this rank's c x L scores;
2. softmax over the whole row (padding and causal masks applied by global position);
3. ring-pass the values: O_r = sum_j P[:, :, :, chunk j] V_j.
The c x L probabilities are kept for backward: memory grows with L^2 / n, which is what `ring` avoids.

Backward: ring-pass the values again for dP_j = dO_r V_j^T, while dV_j = P_j^T dO_r travels with V_j back to its
owner; softmax backward dS = P * (dP - rowsum(dP * P)); ring-pass the keys for dQ_r = sum_j dS_j K_j / sqrt(D), while
dK_j = dS_j^T Q_r / sqrt(D) travels home. Communication: forward 2(n-1) exchanges; backward 2(n-1) for K and V and
2n for their gradient accumulators (see `seqpar.parallel.comm.ring_pass`), plus one all-gather of padding masks
(and one of document ids with document masking, which masks the c x L scores where documents differ).

Memory, in c x L score blocks (fp32): one in forward (the scores, masked and turned into probabilities in place,
then kept for backward) and one more in backward (dP, written block by block by the matmuls and turned into dS in
place), so a rank peaks at two blocks plus chunk-sized buffers. rowsum(dP * P) needs no block of its own: it is
rowsum(dO * O) (sum_j P_ij dO_i . V_j = dO_i . O_i), from the output kept in fp32. Inputs of lower precision keep
the same rules (scores in the input dtype, softmax and its backward in fp32, probabilities and dS stored in the
input dtype) at the cost of an fp32 copy where the dtype changes.

Grouped-query attention: keys and values keep their H_kv heads on the ring (and their gradient accumulators too);
the matmuls broadcast each over its group of H / H_kv query heads ((B, H_kv, H/H_kv, ...) views), so no expanded
copy exists and a ring step moves H / H_kv times fewer bytes.

Causal attention expects the zigzag layout of the other implementations (it masks by global position).
"""

from __future__ import annotations

import math

import torch

from seqpar.parallel.comm import all_gather_list, ring_pass
from seqpar.parallel.sequence.chunks import chunk_indices


def _bias(masks: list[torch.Tensor | None], q_pos: torch.Tensor, positions: list[torch.Tensor], causal: bool,
          docs: list[torch.Tensor] | None = None, q_docs: torch.Tensor | None = None):
    """Boolean (B or 1, 1, c, L) "may attend" mask with key columns in rank order, or None. `docs`: every rank's
    (B, c) document ids, `q_docs` this rank's (a query attends to keys of its document only)."""
    allowed = None
    if causal:
        allowed = (q_pos[:, None] >= torch.cat(positions)[None, :])[None, None]
    if masks[0] is not None:
        keys = torch.cat(masks, dim=1)[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    if docs is not None:
        same = (q_docs[:, :, None] == torch.cat(docs, dim=1)[:, None, :])[:, None]  # (B, 1, c, L)
        allowed = same if allowed is None else allowed & same
    return allowed


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, ...) -> (B, H_kv, H/H_kv, ...): query heads by the key/value head they share (a view)."""
    return x.view(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def _softmax_(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim computed in fp32: into `s`'s own buffer when `s` is fp32, else a new tensor."""
    if s.dtype == torch.float32:
        return torch.softmax(s, dim=-1, out=s)
    return torch.softmax(s, dim=-1, dtype=torch.float32)


class _RSAFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, doc_ids, causal: bool, group):
        b, h, c, d = q.shape
        n = torch.distributed.get_world_size(group)
        r = torch.distributed.get_rank(group)
        scale = 1.0 / math.sqrt(d)
        masks = all_gather_list(key_mask, group) if key_mask is not None else [None] * n
        docs = all_gather_list(doc_ids, group) if doc_ids is not None else None
        positions = [chunk_indices(c * n, n, j, causal).to(q.device) for j in range(n)]

        hk = k.shape[1]
        q = q * scale  # scaled once here (c x D), not each score block; dK needs it scaled too
        s = torch.empty(b, h, c, n * c, dtype=q.dtype, device=q.device)  # this rank's rows of the score matrix

        def scores(src, k_src):  # (B, H_kv, G, c, D) @ (B, H_kv, 1, D, c) -> this block's (B, H_kv, G, c, c)
            torch.matmul(_grouped(q, hk), k_src.transpose(-1, -2)[:, :, None],
                         out=_grouped(s[..., src * c : (src + 1) * c], hk))

        ring_pass(k, group, scores)
        allowed = _bias(masks, positions[r], positions, causal, docs, doc_ids)
        if allowed is not None:
            s.masked_fill_(~allowed, float("-inf"))
        p = _softmax_(s)
        s = None  # fp32: p is s; else the scores go now (the closure above shares this variable)
        if allowed is not None:
            p.nan_to_num_(0.0)  # a query with no attendable key at all
        p = p.to(q.dtype)

        out = torch.zeros(b, h, c, d, dtype=torch.float32, device=q.device)

        def weighted_values(src, v_src):
            _grouped(out, hk).add_(_grouped(p[..., src * c : (src + 1) * c], hk) @ v_src[:, :, None])

        ring_pass(v, group, weighted_values)
        ctx.save_for_backward(q, k, v, p, out)
        ctx.group, ctx.scale, ctx.c = group, scale, c
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p, out = ctx.saved_tensors  # q is scaled by 1/sqrt(D)
        group, scale, c = ctx.group, ctx.scale, ctx.c
        hk = k.shape[1]
        dout = dout.contiguous()
        rowsum = (dout.float() * out).sum(-1, keepdim=True)  # = rowsum(dP * P), (B, H, c, 1)
        dp = torch.empty(p.shape, dtype=torch.float32, device=p.device)

        def grad_values(src, v_src):
            cols = slice(src * c, (src + 1) * c)
            dp_j = dp[..., cols]
            v_t = v_src.transpose(-1, -2)[:, :, None]  # (B, H_kv, 1, D, c): shared by its query heads
            if dout.dtype == dp.dtype:
                torch.matmul(_grouped(dout, hk), v_t, out=_grouped(dp_j, hk))
            else:
                _grouped(dp_j, hk).copy_(_grouped(dout, hk) @ v_t)
            # dV_src from our queries, summed over each key/value head's query heads
            dv_j = (_grouped(p[..., cols], hk).transpose(-1, -2) @ _grouped(dout, hk)).sum(2)
            dp_j.sub_(rowsum).mul_(p[..., cols])  # softmax backward, in place: dS_j
            return dv_j

        dv = ring_pass(v, group, grad_values, grad=True)
        ds = dp.to(q.dtype)  # fp32: dp itself
        dp = None
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)

        def grad_keys(src, k_src):
            cols = slice(src * c, (src + 1) * c)
            ds_j = _grouped(ds[..., cols], hk)
            _grouped(dq, hk).add_(ds_j @ k_src[:, :, None], alpha=scale)
            return (ds_j.transpose(-1, -2) @ _grouped(q, hk)).sum(2)  # dK_src from our queries (q already scaled)

        dk = ring_pass(k, group, grad_keys, grad=True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


class RingSelfAttention:
    """The paper's Ring Self-Attention as a core-attention function over `group` (this rank's chunk in, out)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, q, k, v, *, causal: bool, key_padding_mask: torch.Tensor | None, dropout_p: float,
                 document_ids: torch.Tensor | None = None):
        if dropout_p:
            raise ValueError("Ring Self-Attention here has no attention dropout; set model.attn_dropout=0")
        mask = key_padding_mask.bool() if key_padding_mask is not None else None
        return _RSAFn.apply(q, k, v, mask, document_ids, causal, self.group)
