"""Sequence parallelism: each rank of an sp group holds a chunk of every sequence; attention crosses ranks.

Chunk layout (`chunks.py`: `chunk_indices`): bidirectional models (BERT) give rank r the contiguous r-th of sp chunks; causal
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

from seqpar.parallel.sequence.chunks import chunk_indices, shard_batch, shard_sequence
from seqpar.parallel.sequence.hybrid import HybridAttention
from seqpar.parallel.sequence.ring import RingAttention
from seqpar.parallel.sequence.rsa import RingSelfAttention
from seqpar.parallel.sequence.ulysses import UlyssesAttention

IMPLS = {"ring": RingAttention, "rsa": RingSelfAttention, "ulysses": UlyssesAttention}

__all__ = ["IMPLS", "HybridAttention", "RingAttention", "RingSelfAttention", "UlyssesAttention", "chunk_indices",
           "sequence_attention", "shard_batch", "shard_sequence"]


def sequence_attention(impl: str, group, ring_group=None):
    """The core-attention function of `parallel.sp_impl` = `impl` over the sp process group `group` (hybrid: `group`
    is the Ulysses group and `ring_group` the ring's)."""
    if impl == "hybrid":
        return HybridAttention(group, ring_group)
    return IMPLS[impl](group)
