"""Linformer attention under sequence parallelism (`model.attention=linformer`, BERT).

Linformer projects the keys and values along the sequence, E K and F V with E, F of shape (k, L), so that each
query attends to k rows instead of L. The projection is a sum over positions, so it splits over the sp ranks like
any sum: rank r multiplies the columns of E for its chunk's positions by its own L/sp keys, and one all-reduce of
the (B, H, k, D) parts gives every rank the projected keys (and values) of the whole sequence. Queries never
leave their rank and attention is local: every length-dependent term (queries, keys, values, scores L/sp x k)
is divided by sp, and the communication per layer is 2 x B x H x k x D, independent of the sequence length.
This is the combination the paper used for its longest sequences (114K tokens).

The all-reduce is differentiable (its backward all-reduces the gradient of the projected keys), so every rank's
keys get the gradient of all queries that used them. BERT's chunks are contiguous, so rank r's positions are
r*L/sp ... (r+1)*L/sp - 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce


class SequenceParallelProjection:
    """`project_sequence` (see seqpar.models.layers) for this rank's contiguous chunk, summed over `group`."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)

    def __call__(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[-2]  # this rank's chunk length
        part = torch.matmul(weight[:, self.rank * t : (self.rank + 1) * t], x)
        return all_reduce(part, op=dist.ReduceOp.SUM, group=self.group)
