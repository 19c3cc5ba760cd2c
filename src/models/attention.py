"""Core attention: the one swappable function through which every attention layer computes softmax(QK^T)V.

Models call `self.core_attention(q, k, v, ...)`; `set_core_attention(model, fn)` replaces it on every layer, which is
how sequence-parallel attention (ring, rsa, ulysses) is swapped in without the model knowing. A replacement must
accept the same arguments and return the same shape.

Document masking (`data.document_mask`): `document_ids` (B, T) gives the document of each token (queries and keys
are the same tokens in self-attention; under sequence parallelism this rank's chunk of them); a query attends only
to keys of its own document, on top of the causal and padding masks. Implementations honour it by the documents'
tokens, with no padding of documents: SDPA with a block-diagonal boolean mask up to `DENSE_DOCUMENT_TOKENS` tokens,
beyond them `document_attention` (tiles of queries, each with the keys its documents reach: no T x T mask), the sp
implementations per block.

Grouped-query attention: k and v may have fewer heads than q (H_kv dividing H); query head i uses key/value head
i // (H / H_kv), as transformers' `repeat_kv` orders them. Implementations expand k and v to the query heads only
where they compute (`repeat_kv`), so what they keep and send stays H_kv heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from seqpar.models.documents import DOCUMENT_TILE, one_document, shared_documents, tiles

# Up to this many tokens single-device attention with documents takes one dense (B, 1, T, T) mask (4 MiB a row at
# 2048: one kernel call beats the tiles' several); beyond, `document_attention`'s tiles.
DENSE_DOCUMENT_TOKENS = 2048


class CoreAttention(Protocol):
    def __call__(
        self,
        q: torch.Tensor,  # (B, H, Tq, D)
        k: torch.Tensor,  # (B, H_kv, Tk, D), H_kv dividing H
        v: torch.Tensor,  # (B, H_kv, Tk, D)
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None,  # (B, Tk) bool, True = attend; None = no padding
        dropout_p: float,
        document_ids: torch.Tensor | None,  # (B, T) int: each token's document; None = one document
    ) -> torch.Tensor: ...  # (B, H, Tq, D)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-device attention with PyTorch's fused kernels (flash / memory-efficient where they apply)."""
    if document_ids is not None and q.shape[-2] > DENSE_DOCUMENT_TOKENS:
        return document_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                  document_ids=document_ids)
    mask = None
    if key_padding_mask is not None or document_ids is not None:
        # A padded key, or one of another document, is never attended to; causal + padding + documents are folded
        # into one boolean mask (block-diagonal with documents).
        mask = _allowed(q, k, causal, key_padding_mask, document_ids)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H_kv, T, D) keys or values -> (B, heads, T, D): each head repeated for its group of query heads (the
    input itself when it has `heads` heads already)."""
    if x.shape[1] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _allowed(q: torch.Tensor, k: torch.Tensor, causal: bool, key_padding_mask: torch.Tensor | None,
             document_ids: torch.Tensor | None = None, key_document_ids: torch.Tensor | None = None,
             offset: int = 0) -> torch.Tensor | None:
    """The boolean (.., Tq, Tk) mask of allowed query-key pairs (True = attend), or None when all are. The keys'
    document ids are the queries' unless given; causal: query i sees keys up to i + `offset` (the keys start
    `offset` tokens before the queries)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
    if document_ids is not None:
        key_ids = document_ids if key_document_ids is None else key_document_ids
        same = (document_ids[:, :, None] == key_ids[:, None, :])[:, None]  # (B, 1, Tq, Tk)
        mask = same if mask is None else mask & same
    if causal:
        tril = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(offset)
        mask = tril if mask is None else mask & tril
    return mask


# A query tile of `document_attention`: its queries, the keys its documents reach, and whether a mask is needed
# (False: one document throughout and no padding).
Tile = tuple[slice, slice, bool]


def document_tiles(document_ids: torch.Tensor, causal: bool, key_padding_mask: torch.Tensor | None,
                   tile: int) -> list[Tile]:
    """The query tiles of `document_attention` for (B, T) host document ids: each tile of `tile` queries with the
    keys of its documents (causal: from its first document's start to its last query; bidirectional: to its last
    document's end), over all batch rows."""
    t = document_ids.shape[-1]
    padded = key_padding_mask is not None
    out = []
    for qs in tiles(slice(0, t), tile):
        _, ks = shared_documents(document_ids, document_ids, qs, slice(0, qs.stop if causal else t))
        masked = padded or not one_document(document_ids[:, qs], document_ids[:, ks])
        out.append((qs, ks, masked))
    return out


def _tile_attention(qt, kt, vt, spec: Tile, causal: bool, key_padding_mask, document_ids, dropout_p: float):
    """SDPA of one query tile (`qt`: q[:, :, qs]) over its keys (`kt`, `vt`: k and v [:, :, ks]): a (B, 1, tile,
    keys) mask where documents or padding need one, else the plain (causal: lower-right aligned) kernel."""
    qs, ks, masked = spec
    gqa, offset = kt.shape[1] != qt.shape[1], qs.start - ks.start
    if masked:
        pad = key_padding_mask[:, ks] if key_padding_mask is not None else None
        mask = _allowed(qt, kt, causal, pad, document_ids[:, qs], document_ids[:, ks], offset)
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    if causal and offset:  # queries after the first keys of their document: query i sees keys up to i + offset
        # (a tile-sized mask; torch's causal_lower_right would import torch._dynamo into every process)
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=_allowed(qt, kt, True, None, offset=offset),
                                              dropout_p=dropout_p, enable_gqa=gqa)
    return F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, is_causal=causal, enable_gqa=gqa)


class _DocumentAttentionFn(torch.autograd.Function):
    """`document_attention`'s tiles with nothing kept but q, k and v: backward recomputes each tile's forward (its
    mask too) and adds its gradients, so at most one tile's mask and scores exist at a time."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, document_ids, plan: list[Tile], causal: bool, dropout_p: float):
        rng = _rng_state(q.device) if dropout_p else None  # backward redraws forward's dropout masks
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (B, H, T, Dv)
        for spec in plan:
            qs, ks, _ = spec
            out[:, :, qs] = _tile_attention(q[:, :, qs], k[:, :, ks], v[:, :, ks], spec, causal, key_padding_mask,
                                            document_ids, dropout_p)
        ctx.save_for_backward(q, k, v, key_padding_mask, document_ids)
        ctx.plan, ctx.causal, ctx.dropout_p, ctx.rng = plan, causal, dropout_p, rng
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, key_padding_mask, document_ids = ctx.saved_tensors
        dq = torch.empty_like(q)  # every query is in exactly one tile
        dk, dv = (torch.zeros_like(x, dtype=torch.float32) for x in (k, v))  # keys are in several tiles: fp32 sums
        devices = [q.device] if q.device.type == "cuda" else []
        with torch.random.fork_rng(devices, enabled=ctx.rng is not None), torch.enable_grad():
            if ctx.rng is not None:
                _set_rng_state(q.device, ctx.rng)
            for spec in ctx.plan:
                qs, ks, _ = spec
                # The tile's own leaves, so that its gradients come back tile-sized (not as full-sized slices)
                qt, kt, vt = (x.detach()[:, :, s].requires_grad_() for x, s in ((q, qs), (k, ks), (v, ks)))
                out = _tile_attention(qt, kt, vt, spec, ctx.causal, key_padding_mask, document_ids, ctx.dropout_p)
                gq, gk, gv = torch.autograd.grad(out, (qt, kt, vt), dout[:, :, qs])
                dq[:, :, qs] = gq
                dk[:, :, ks] += gk
                dv[:, :, ks] += gv
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def document_attention(
    q: torch.Tensor,  # (B, H, T, D)
    k: torch.Tensor,  # (B, H_kv, T, D)
    v: torch.Tensor,  # (B, H_kv, T, D)
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,  # (B, T) bool, True = attend
    dropout_p: float,
    document_ids: torch.Tensor,  # (B, T) int, never decreasing along a row
    tile: int | None = None,
) -> torch.Tensor:  # (B, H, T, D)
    """Self-attention with document masking, one tile of `tile` (`DOCUMENT_TILE`) queries at a time: each tile
    attends to the keys its documents reach (`document_tiles`), with a (B, 1, tile, keys) mask where it holds more
    than one document or there is padding, with none where it lies inside one document. The masks are
    O(tile x (tile + longest document)) at a time, never T x T; backward recomputes each tile (one attention forward
    more) rather than keeping the masks."""
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"document masking is self-attention: {q.shape[-2]} queries, {k.shape[-2]} keys")
    mask = key_padding_mask.bool() if key_padding_mask is not None else None
    if mask is not None and bool(mask.all()):
        mask = None  # no padding: tiles inside one document need no mask
    ids = document_ids.cpu()  # the tiles' slices are the host's
    if bool((ids.diff(dim=-1) < 0).any()):
        raise ValueError("document_ids must not decrease along a row (documents numbered in order, as "
                         "PackedSequences gives them)")
    plan = document_tiles(ids, causal, mask, tile or DOCUMENT_TILE)
    return _DocumentAttentionFn.apply(q, k, v, mask, document_ids, plan, causal, dropout_p)


def masked_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with the probabilities in memory, the same arithmetic as PyTorch's math SDPA kernel (scale split
    over q and k, masked scores at -inf, rows with no allowed key give 0), and `dropout` applied to the
    probabilities by the caller's function: for a dropout whose mask must come from somewhere else than one draw
    over these heads (tensor parallelism: this rank's heads' part of the mask for all heads)."""
    scale = math.sqrt(1.0 / math.sqrt(q.shape[-1]))
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = (q * scale) @ (k.transpose(-2, -1) * scale)
    mask = _allowed(q, k, causal, key_padding_mask, document_ids)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # a query with no key to attend to
    if dropout is not None:
        probs = dropout(probs)
    return probs @ v


def set_core_attention(model: nn.Module, fn: CoreAttention) -> None:
    """Route every attention layer of `model` through `fn`."""
    found = False
    for module in model.modules():
        if hasattr(module, "core_attention"):
            module.core_attention = fn
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention layer with a core_attention hook")


def set_sequence_projection(model: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Route every Linformer attention layer's projection along the sequence through `fn(weight, x)`."""
    layers = [m for m in model.modules() if hasattr(m, "sequence_projection")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linformer attention layer")
    for module in layers:
        module.sequence_projection = fn
