"""Blending prepared datasets by weight (`data.sources=[{path: A, weight: 0.7}, {path: B, weight: 0.3}]`).

The semantics are Megatron-LM's blended dataset: a fixed schedule says which source each position of the blend
reads, so that every prefix of the schedule holds each source in its weight's proportion up to rounding (within
one or two sequences of weight x length), and so every global batch (a run of consecutive positions) draws from the
sources in those proportions. Within a source, sequences are taken in a permutation drawn from (seed, epoch,
source); a source whose share exceeds its size is read again in a new permutation (upsampled), a larger one is read
in part each epoch. The schedule is computed by stride scheduling (the k-th sequence of source s, from 0, is due at
time (k + 1/2) / w_s; positions go to the earliest due, ties to the lower source), vectorised, in place of Megatron's loop over
every position (the same idea: the source furthest behind its share goes next).

A blend orders itself (`orders_itself`): the loader reads its positions in order instead of shuffling them.
"""

from __future__ import annotations

import numpy as np


def blend_schedule(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each position, its rank within that source) for `size` positions and normalised `weights`."""
    sources, ranks, due = [], [], []
    for s, w in enumerate(weights):
        n = int(np.ceil(w * size)) + 1  # more than the source can be due for within `size` positions
        k = np.arange(n, dtype=np.int64)
        sources.append(np.full(n, s, dtype=np.int64))
        ranks.append(k)
        due.append((k + 0.5) / w)
    order = np.lexsort((np.concatenate(sources), np.concatenate(due)))[:size]
    return np.concatenate(sources)[order], np.concatenate(ranks)[order]


class BlendedSequences:
    """Sequences drawn from several datasets by weight; `get(position, epoch)` reads the position's source."""

    orders_itself = True

    def __init__(self, parts: list, weights: list[float], names: list[str], seed: int):
        self.parts, self.names, self.seed = parts, names, seed
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.size = sum(len(p) for p in parts)  # positions per epoch: the sources' sequences together
        self.source, self.rank = blend_schedule(self.weights, self.size)
        self._perms: dict[tuple[int, int, int], np.ndarray] = {}
        self.seq_len = getattr(parts[0], "seq_len", None)

    def __len__(self) -> int:
        return self.size

    def _index(self, s: int, rank: int, epoch: int) -> int:
        n = len(self.parts[s])
        cycle = rank // n  # an upsampled source's later passes use new permutations
        key = (s, epoch, cycle)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.parts):
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, epoch, s, cycle]).permutation(n)
        return int(self._perms[key][rank % n])

    def get(self, position: int, epoch: int = 0):
        s = int(self.source[position])
        return self.parts[s].get(self._index(s, int(self.rank[position]), epoch), epoch)

    def sequences_by_source(self, epochs: int, positions: int) -> dict[str, int]:
        """Sequences read from each source after `epochs` whole epochs and `positions` more."""
        whole = np.bincount(self.source, minlength=len(self.parts))
        part = np.bincount(self.source[:positions], minlength=len(self.parts))
        return {name: int(epochs * a + b) for name, a, b in zip(self.names, whole, part, strict=True)}
