"""Building blocks shared by the models: self-attention (multi-head or grouped-query, optionally with rotary
positions), the MLP and the gated (SwiGLU) MLP, and the initialisation.

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
from seqpar.models.dropout import DropoutKey, KeyedDropout, block_sites


def rotary(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (RoPE, as transformers' Llama: the feature halves rotated as pairs) of (B, H, T, D)
    queries or keys at their global `position_ids` ((B, T) or (T,)), so a sequence chunk rotates by where it sits."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)  # (D/2,)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2) or (T, D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, D/2): the same for every head
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


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
    if name == "silu":
        return F.silu
    raise ValueError(f"unknown activation {name!r}")


class SelfAttention(nn.Module):
    """Self-attention; the softmax(QK^T)V part goes through `self.core_attention`. Keys and values have
    `cfg.kv_heads` heads (grouped-query attention when fewer than the query heads). `bias`: biases on every
    projection (GPT, BERT), else on q/k/v only with `cfg.qkv_bias` (Llama, Qwen2); `rotary`: queries and keys
    rotated by their positions (RoPE with base `cfg.rope_theta`)."""

    def __init__(self, cfg: ModelConfig, bias: bool = True, rotary: bool = False):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        c, kv = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
        qkv_bias = bias or cfg.qkv_bias
        self.q_proj = nn.Linear(c, c, bias=qkv_bias)
        self.k_proj = nn.Linear(c, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(c, kv, bias=qkv_bias)
        self.o_proj = nn.Linear(c, c, bias=bias)
        self.rope_theta = cfg.rope_theta if rotary else None
        self.attn_dropout = cfg.attn_dropout
        self.causal = cfg.causal
        self.core_attention: CoreAttention = sdpa_attention
        if cfg.attention == "linformer":
            # One projection each for keys and values per layer, shared by the heads (Linformer's headwise sharing).
            self.proj_k = nn.Parameter(torch.empty(cfg.linformer_k, cfg.max_seq_len))
            self.proj_v = nn.Parameter(torch.empty(cfg.linformer_k, cfg.max_seq_len))
            self.sequence_projection = project_sequence

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        # (B, T, C) -> (B, H, T, D) (k, v: H_kv heads); the head count is read from the weight so a sharded layer
        # sees its own heads.
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.rope_theta is not None:
            q, k = rotary(q, position_ids, self.rope_theta), rotary(k, position_ids, self.rope_theta)
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
            document_ids=document_ids,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, C)
        return self.o_proj(y)


class _TiledMLP(torch.autograd.Function):
    """An MLP a tile of tokens at a time (ALST's TiledMLP): forward keeps only the input; backward recomputes each
    tile with autograd, runs its backward (the weights' gradients accumulate as it goes) and keeps its input's
    gradient. The ffn-wide intermediate exists for one tile at a time, in forward and in backward."""

    @staticmethod
    def forward(ctx, x, mlp, tile: int):
        ctx.mlp, ctx.tile = mlp, tile
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([mlp.untiled(part) for part in x.split(tile, dim=1)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        grads = []
        for part, g in zip(x.split(ctx.tile, dim=1), grad.split(ctx.tile, dim=1), strict=True):
            part = part.detach().requires_grad_()
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                out = ctx.mlp.untiled(part)
            torch.autograd.backward(out, g)
            grads.append(part.grad)
        return torch.cat(grads, dim=1), None, None


class Tileable(nn.Module):
    """An MLP that runs `tile_tokens` tokens at a time while autograd records (`set_mlp_tiling`); same numbers."""

    tile_tokens: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if self.tile_tokens and torch.is_grad_enabled() and x.shape[1] > self.tile_tokens:
            return _TiledMLP.apply(x, self, self.tile_tokens)
        return self.untiled(x)


class MLP(Tileable):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size)
        self.act = activation_fn(cfg.activation)

    def untiled(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class GatedMLP(Tileable):
    """The gated MLP of Llama (SwiGLU with `silu`): down(act(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)
        self.act = activation_fn(cfg.activation)

    def untiled(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


def set_mlp_tiling(model: nn.Module, tile_tokens: int | None) -> None:
    """Run every MLP of `model` `tile_tokens` tokens (of each sequence) at a time in training; None: whole."""
    for module in model.modules():
        if isinstance(module, Tileable):
            module.tile_tokens = tile_tokens


class PreNormBlock(nn.Module):
    """A pre-norm transformer block (GPT-2, Llama): x + attn(ln_1(x)), then x + mlp(ln_2(x)), each branch's output
    through hidden dropout. `norm` is the normalisation's class (LayerNorm, RMSNorm)."""

    def __init__(self, cfg: ModelConfig, layer: int, norm: type[nn.Module], attn: SelfAttention, mlp: nn.Module):
        super().__init__()
        self.ln_1 = norm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = attn
        self.ln_2 = norm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = mlp
        attn_site, mlp_site = block_sites(layer)
        self.attn_out_dropout = KeyedDropout(cfg.dropout, attn_site)
        self.mlp_out_dropout = KeyedDropout(cfg.dropout, mlp_site)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                dropout_key: DropoutKey | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        # positions and documents as keywords: tensor parallelism's input preparation sees (x, key_padding_mask)
        attn = self.attn(self.ln_1(x), key_padding_mask, position_ids=position_ids, document_ids=document_ids)
        x = x + self.attn_out_dropout(attn, dropout_key)
        x = x + self.mlp_out_dropout(self.mlp(self.ln_2(x)), dropout_key)
        return x  # (B, T, C)


def _name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for parameter `name` under the run's `seed`."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def initial_value(model: nn.Module, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial value (fp32, on the CPU) of the whole parameter `name` of `model`, drawn from a generator keyed by
    (seed, name): any rank can make the value of any parameter (or its shard) without building the others, and the
    weights are the same in every layout. GPT-2/BERT initialisation: normal(0, model.init_std(name)) weights, zero
    biases, unit LayerNorms and RMSNorms; Linformer's projections normal(0, 1/sqrt(max_len)). `name` may be a tied alias
    (`model.layout.tied`), which takes its embedding's value."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    canonical = model.layout.tied.get(name, name)
    if isinstance(owner, (nn.LayerNorm, nn.RMSNorm)):
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
