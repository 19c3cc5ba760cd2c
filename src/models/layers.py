"""Building blocks shared by GPT and BERT: multi-head self-attention and the MLP.

Single-device code. Query, key and value are separate projections (not one fused matrix) so that tensor parallelism
can shard each by heads with a plain column split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqpar.config import ModelConfig
from seqpar.models.attention import CoreAttention, sdpa_attention


def project_sequence(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Linformer's projection along the sequence: (k, max_len) x (B, H, T, D) -> (B, H, k, D), with the weight's
    first T columns (the positions of a whole sequence). Sequence parallelism swaps in a version that takes the
    columns of this rank's chunk and sums the ranks' parts."""
    return torch.matmul(weight[:, : x.shape[-2]], x)


def activation_fn(name: str):
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown activation {name!r}")


class SelfAttention(nn.Module):
    """Multi-head self-attention; the softmax(QK^T)V part goes through `self.core_attention`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.o_proj = nn.Linear(c, c)
        self.attn_dropout = cfg.attn_dropout
        self.causal = cfg.causal
        self.core_attention: CoreAttention = sdpa_attention
        if cfg.attention == "linformer":
            # One projection each for keys and values per layer, shared by the heads (Linformer's headwise sharing).
            self.proj_k = nn.Parameter(torch.empty(cfg.linformer_k, cfg.max_seq_len))
            self.proj_v = nn.Parameter(torch.empty(cfg.linformer_k, cfg.max_seq_len))
            self.sequence_projection = project_sequence

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        # (B, T, C) -> (B, H, T, D); the head count is read from the weight so a sharded layer sees its own heads.
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if hasattr(self, "proj_k"):  # Linformer: attend to k projected keys/values (padding projected as zeros)
            if key_padding_mask is not None:
                keep = key_padding_mask[:, None, :, None].to(k.dtype)
                k, v = k * keep, v * keep
            k, v = self.sequence_projection(self.proj_k, k), self.sequence_projection(self.proj_v, v)
            key_padding_mask = None
        y = self.core_attention(
            q,
            k,
            v,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size)
        self.act = activation_fn(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.down(self.act(self.up(x)))


def init_weights(module: nn.Module, std: float) -> None:
    """GPT-2/BERT initialisation: normal(0, std) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, SelfAttention) and hasattr(m, "proj_k"):
            # Scale-preserving at the longest sequence: a projected row sums max_len keys.
            for w in (m.proj_k, m.proj_v):
                nn.init.normal_(w, mean=0.0, std=w.shape[1] ** -0.5)
