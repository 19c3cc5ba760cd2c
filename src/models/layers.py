"""Building blocks shared by GPT and BERT: multi-head self-attention and the MLP.

Single-device code. Query, key and value are separate projections (not one fused matrix) so that tensor parallelism
can shard each by heads with a plain column split.
"""

from __future__ import annotations

import hashlib

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


def _name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for parameter `name` under the run's `seed`."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def initial_value(model: nn.Module, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial value (fp32, on the CPU) of the whole parameter `name` of `model`, drawn from a generator keyed by
    (seed, name): any rank can make the value of any parameter (or its shard) without building the others, and the
    weights are the same in every layout. GPT-2/BERT initialisation: normal(0, model.init_std(name)) weights, zero
    biases, unit LayerNorms; Linformer's projections normal(0, 1/sqrt(max_len)). `name` may be a tied alias
    (`model.layout.tied`), which takes its embedding's value."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    canonical = model.layout.tied.get(name, name)
    if isinstance(owner, nn.LayerNorm):
        return torch.ones(shape) if attr == "weight" else torch.zeros(shape)
    if attr == "bias":
        return torch.zeros(shape)
    # Linformer's projections are scale-preserving at the longest sequence: a projected row sums max_len keys.
    std = shape[1] ** -0.5 if attr in ("proj_k", "proj_v") else model.init_std(canonical)
    g = torch.Generator().manual_seed(_name_seed(seed, canonical))
    return torch.empty(shape).normal_(0.0, std, generator=g)


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int | None = None) -> None:
    """Give every parameter of a single-device `model` its initial value (`initial_value`). `seed` None: one drawn
    from torch's global RNG, so `torch.manual_seed(s)` before building a model fixes its weights."""
    if any(p.is_meta for p in model.parameters()):
        return  # built on the meta device: initialised once materialised (seqpar.parallel.parallelize.materialize)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), device="cpu"))
    for name, p in model.named_parameters():
        p.copy_(initial_value(model, name, tuple(p.shape), seed))
