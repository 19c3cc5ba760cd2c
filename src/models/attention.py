"""Core attention: the one swappable function through which every attention layer computes softmax(QK^T)V.

Models call `self.core_attention(q, k, v, ...)`; `set_core_attention(model, fn)` replaces it on every layer, which is
how sequence-parallel attention (ring, rsa, ulysses) is swapped in without the model knowing. A replacement must
accept the same arguments and return the same shape.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class CoreAttention(Protocol):
    def __call__(
        self,
        q: torch.Tensor,  # (B, H, Tq, D)
        k: torch.Tensor,  # (B, H, Tk, D)
        v: torch.Tensor,  # (B, H, Tk, D)
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None,  # (B, Tk) bool, True = attend; None = no padding
        dropout_p: float,
    ) -> torch.Tensor: ...  # (B, H, Tq, D)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    """Single-device attention with PyTorch's fused kernels (flash / memory-efficient where they apply)."""
    mask = None
    if key_padding_mask is not None:
        # A padded key is never attended to; causal + padding is folded into one boolean mask.
        mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
        if causal:
            tq, tk = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
            causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


def set_core_attention(model: nn.Module, fn: CoreAttention) -> None:
    """Route every attention layer of `model` through `fn`."""
    found = False
    for module in model.modules():
        if hasattr(module, "core_attention"):
            module.core_attention = fn
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention layer with a core_attention hook")
