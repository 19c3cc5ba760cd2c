"""Sequence parallelism: each rank of an sp group holds a chunk of every sequence; attention crosses ranks.

Chunk layout (`chunk_indices`): bidirectional models (BERT) give rank r the contiguous r-th of sp chunks; causal
models (GPT) cut the sequence into 2*sp chunks and give rank r chunks r and 2*sp-1-r ("zigzag"), so every rank has
the same amount of causal work. Positions, labels and masks are made on the whole sequence and cut with the same
indices (`shard_batch`).

Three attention implementations, chosen by `parallel.sp_impl` (`sequence_attention`):
- `ring` (ring.py): blockwise with an online softmax and saved log-sum-exp; memory linear in L/sp.
- `rsa` (rsa.py): the paper's Ring Self-Attention; builds this rank's L/sp x L scores; the reference baseline.
- `ulysses` (ulysses.py): all-to-all from sequence to head sharding, whole-sequence attention, all-to-all back.
Each is a core-attention function (`seqpar.models.attention.CoreAttention`) taking this rank's chunk.
"""

from __future__ import annotations

import torch

from seqpar.parallel.sequence.ring import RingAttention
from seqpar.parallel.sequence.rsa import RingSelfAttention
from seqpar.parallel.sequence.ulysses import UlyssesAttention

IMPLS = {"ring": RingAttention, "rsa": RingSelfAttention, "ulysses": UlyssesAttention}

__all__ = ["IMPLS", "RingAttention", "RingSelfAttention", "UlyssesAttention", "chunk_indices", "sequence_attention",
           "shard_batch", "shard_sequence"]


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


def sequence_attention(impl: str, group):
    """The core-attention function of `parallel.sp_impl` = `impl` over the sp process group `group`."""
    return IMPLS[impl](group)
