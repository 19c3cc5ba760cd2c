"""Which positions of a sequence each sp rank holds (contiguous for bidirectional models, zigzag for causal ones),
and this rank's chunk of a batch cut with them."""

from __future__ import annotations

import torch


def chunk_indices(seq_len: int, sp: int, rank: int, zigzag: bool) -> torch.Tensor:
    """Positions of the global sequence held by `rank` (contiguous, or chunks r and 2*sp-1-r for zigzag)."""
    parts = 2 * sp if zigzag else sp
    if seq_len % parts:
        layout = "zigzag (causal)" if zigzag else "contiguous"
        raise ValueError(f"sequence length {seq_len} is not divisible by {parts}, needed for the {layout} layout at sp={sp}")
    c = seq_len // parts
    if not zigzag:
        return torch.arange(rank * c, (rank + 1) * c)
    j = 2 * sp - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange(j * c, (j + 1) * c)])


def shard_sequence(x: torch.Tensor, sp: int, rank: int, zigzag: bool, dim: int = 1) -> torch.Tensor:
    """This rank's chunk of `x` along `dim` (the sequence dim)."""
    return x.index_select(dim, chunk_indices(x.shape[dim], sp, rank, zigzag).to(x.device))


def shard_batch(batch: dict[str, torch.Tensor], sp: int, rank: int, zigzag: bool) -> dict[str, torch.Tensor]:
    """This rank's chunk of every (B, T) tensor of a batch (ids, positions, labels, masks, token types); per-sequence
    (B,) tensors (dropout seeds) are kept whole."""
    return {k: shard_sequence(v, sp, rank, zigzag, dim=1) if v.dim() > 1 else v for k, v in batch.items()}
