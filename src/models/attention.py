"""Core attention: the one swappable function through which every attention layer computes softmax(QK^T)V.

Models call `self.core_attention(q, k, v, ...)`; `set_core_attention(model, fn)` replaces it on every layer, which is
how sequence-parallel attention (ring, rsa, ulysses) is swapped in without the model knowing. A replacement must
accept the same arguments and return the same shape.

Document masking (`data.document_mask`): `document_ids` (B, T) gives the document of each token (queries and keys
are the same tokens in self-attention; under sequence parallelism this rank's chunk of them); a query attends only
to keys of its own document, on top of the causal and padding masks. Implementations honour it by the documents'
tokens, with no padding of documents: SDPA with a block-diagonal boolean mask, the sp implementations per block.

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
             document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """The boolean (.., Tq, Tk) mask of allowed query-key pairs (True = attend), or None when all are."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
    if document_ids is not None:
        same = (document_ids[:, :, None] == document_ids[:, None, :])[:, None]  # (B, 1, T, T)
        mask = same if mask is None else mask & same
    if causal:
        tril = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = tril if mask is None else mask & tril
    return mask


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
