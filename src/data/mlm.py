"""BERT's masked-language-model corruption, deterministic from (seed, epoch, example index).

Of the maskable tokens (not [CLS], [SEP] or padding) a fixed share (15% by default, at least one) is selected; each
selected token becomes [MASK] with probability 0.8, a random ordinary token with 0.1, and stays itself with 0.1. The
label is the original token at selected positions and -100 elsewhere. The same example in the same epoch is masked
the same way whatever the layout or rank that reads it.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def mlm_mask(
    ids: np.ndarray,  # (L,) token ids
    maskable: np.ndarray,  # (L,) bool: positions that may be selected
    rng: np.random.Generator,
    mask_id: int,
    random_ids: np.ndarray,  # ordinary (non-special) token ids to draw replacements from
    probability: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:  # corrupted ids (L,), labels (L,)
    candidates = np.flatnonzero(maskable)
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    out = ids.astype(np.int64, copy=True)
    if len(candidates) == 0:
        return out, labels
    n = max(1, int(round(probability * len(candidates))))
    chosen = np.sort(rng.choice(candidates, size=n, replace=False))
    labels[chosen] = ids[chosen]
    r = rng.random(n)
    out[chosen[r < 0.8]] = mask_id
    swap = chosen[(r >= 0.8) & (r < 0.9)]
    out[swap] = random_ids[rng.integers(0, len(random_ids), size=len(swap))]
    return out, labels


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))
