"""Hidden dropout whose masks depend on what a token is, never on where it is computed.

A mask element is a hash of (the sequence's dropout seed, the dropout site, the token's global position, the
feature): a counter-based generator with no state. The training loop gives every sequence of the global batch a
seed made from (trainer.seed, epoch, step, the sequence's slot in the global batch: `seqpar.data.loader`), and positions are the global
ones the model already takes (`position_ids`, made on the whole sequence). So a data-parallel replica, a sequence
chunk, a tensor-parallel token shard, a pipeline stage or a micro-batch draws exactly the elements of the mask one
process draws for the same token, and every layout trains with the same masks (none of them depends on rank,
micro-batch or RNG state, so activation checkpointing's recompute also redraws the same mask). The positions must be
unique within a sequence (they are: `0..seq_len-1`).

Without a key (a model called directly, outside the trainer) the modules are torch's dropout.

The hash: a 64-bit mix (splitmix64's finaliser) of (seed, site, position) per token, then per element a 32-bit
multiply-xorshift mix (murmur3's finaliser) of that token key xor a per-feature key; an element is kept when its
signed 32-bit hash lies above the quantile `p`. Integer arithmetic wraps in two's complement on every backend, so
CPU and CUDA draw the same masks. Backward keeps the boolean mask, as torch's dropout does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _signed(c: int, bits: int) -> int:
    """An unsigned constant as the signed integer of the same bits (what torch's int tensors hold)."""
    return c - (1 << bits) if c >= 1 << (bits - 1) else c


_M1, _M2 = _signed(0xBF58476D1CE4E5B9, 64), _signed(0x94D049BB133111EB, 64)
_GOLDEN64 = _signed(0x9E3779B97F4A7C15, 64)
_F1, _F2 = _signed(0x85EBCA6B, 32), _signed(0xC2B2AE35, 32)
_GOLDEN32 = _signed(0x9E3779B9, 32)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (logical shifts: arithmetic ones masked to the shifted-in width)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def _mix32_(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser, in place, without its last xorshift (only the high bits are compared)."""
    h ^= (h >> 16) & 0xFFFF
    h *= _F1
    h ^= (h >> 13) & 0x7FFFF
    h *= _F2
    return h


def _site_key(site: int) -> int:
    """splitmix64's finaliser of site + 1, in Python (a plain number: no tensor made on the device for it)."""
    x, mask = site + 1, (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return _signed(x ^ (x >> 31), 64)


@dataclass
class DropoutKey:
    """What a dropout mask is drawn from: one seed per sequence and each token's global position."""

    seeds: torch.Tensor  # (B,) int64
    positions: torch.Tensor  # (B, T) or (T,) int64, global positions of the tokens held here

    def tokens(self, start: int, length: int) -> DropoutKey:
        """The key of tokens start..start+length-1 of the held ones (a token shard)."""
        return DropoutKey(self.seeds, self.positions.narrow(-1, start, length))


def keep_mask(key: DropoutKey, site: int, width: int, p: float) -> torch.Tensor:
    """(B, T, width) bool: which elements dropout with probability `p` keeps at `site` for the tokens of `key`."""
    seeds = key.seeds.to(torch.int64)[:, None]  # (B, 1)
    pos = key.positions.to(device=seeds.device, dtype=torch.int64)
    pos = pos if pos.dim() == 2 else pos[None]  # (B or 1, T)
    token = _mix64(_mix64(seeds + _site_key(site)) + pos * _GOLDEN64)
    feature = _mix32_(torch.arange(1, width + 1, dtype=torch.int32, device=seeds.device) * _GOLDEN32)
    h = _mix32_(token.to(torch.int32)[..., None] ^ feature)  # (B, T, width) int32
    threshold = min(max(round(-(2**31) + p * 2**32), -(2**31)), 2**31 - 1)
    return h >= threshold


def keyed_dropout(x: torch.Tensor, key: DropoutKey, site: int, p: float) -> torch.Tensor:
    """Dropout of x (B, T, C) with the mask of `key` at `site`; kept elements scaled by 1 / (1 - p)."""
    keep = keep_mask(key, site, x.shape[-1], p)
    return torch.where(keep, x * (1.0 / (1.0 - p)), x.new_zeros(()))


class KeyedDropout(nn.Module):
    """Hidden dropout at one site of the model (`site`: a number unique in the model, fixed by its structure)."""

    def __init__(self, p: float, site: int):
        super().__init__()
        self.p, self.site = p, site

    def forward(self, x: torch.Tensor, key: DropoutKey | None = None) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if key is None:
            return F.dropout(x, self.p, training=True)
        return keyed_dropout(x, key, self.site, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"


def block_sites(layer: int) -> tuple[int, int]:
    """The two dropout sites of transformer block `layer` (after attention, after the MLP); site 0 is the
    embeddings'."""
    return 1 + 2 * layer, 2 + 2 * layer
