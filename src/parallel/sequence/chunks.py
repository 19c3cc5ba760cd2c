"""Which positions of a sequence each sp rank holds (contiguous for bidirectional models, zigzag for causal ones),
and this rank's chunk of a batch cut with them."""

from __future__ import annotations

import torch


def chunk_indices(seq_len: int, sp: int, rank: int, zigzag: bool, ulysses: int = 1) -> torch.Tensor:
    """Positions of the global sequence held by `rank` (contiguous, or chunks r and 2*sp-1-r for zigzag).

    `ulysses` > 1 (two-level sp, `hybrid.py`): rank r = j * ulysses + u of a ring of sp / ulysses groups holds, for
    zigzag, the u-th part of ring chunks j and 2R-1-j (R = sp / ulysses), so that its Ulysses group together holds
    the ring's zigzag chunk pair j; contiguous chunks are the same as without it."""
    parts = 2 * sp if zigzag else sp
    if seq_len % parts:
        layout = "zigzag (causal)" if zigzag else "contiguous"
        raise ValueError(f"sequence length {seq_len} is not divisible by {parts}, needed for the {layout} layout at sp={sp}")
    c = seq_len // parts
    if not zigzag:
        return torch.arange(rank * c, (rank + 1) * c)
    ring, (j, u) = sp // ulysses, divmod(rank, ulysses)
    early, late = j * ulysses + u, (2 * ring - 1 - j) * ulysses + u
    return torch.cat([torch.arange(early * c, (early + 1) * c), torch.arange(late * c, (late + 1) * c)])


def shard_sequence(x: torch.Tensor, sp: int, rank: int, zigzag: bool, dim: int = 1, ulysses: int = 1) -> torch.Tensor:
    """This rank's chunk of `x` along `dim` (the sequence dim)."""
    return x.index_select(dim, chunk_indices(x.shape[dim], sp, rank, zigzag, ulysses).to(x.device))


def shard_batch(batch: dict[str, torch.Tensor], sp: int, rank: int, zigzag: bool,
                ulysses: int = 1) -> dict[str, torch.Tensor]:
    """This rank's chunk of every (B, T) tensor of a batch (ids, positions, labels, masks, token types); per-sequence
    (B,) tensors (dropout seeds) are kept whole."""
    return {k: shard_sequence(v, sp, rank, zigzag, 1, ulysses) if v.dim() > 1 else v for k, v in batch.items()}
