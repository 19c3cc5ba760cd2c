"""The loader: this data-parallel rank's share of each global batch, deterministic and resumable.

Each epoch visits the training sequences in a permutation drawn from (seed, epoch). Step s of an epoch takes the
global batch perm[s*G:(s+1)*G] (a short tail is dropped), and data-parallel rank r of D takes the r-th contiguous
G/D of it. The order therefore depends on the seed and the global batch only, never on the layout, and the
position (epoch, step) is the whole state: `state_dict()` / `load_state_dict()` save and restore it.

Each training sequence also carries `dropout_seed`, a 63-bit hash of (seed, epoch, step, its slot in the global
batch): the model draws its dropout masks from it and the token positions (`seqpar.models.dropout`), so the masks
are the same in every layout.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from seqpar.data.sequences import Example


def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}


def permutation(n: int, rng: np.random.Generator) -> np.ndarray:
    """`rng.permutation(n)` in 4-byte indices while they fit: the same order (a shuffle's draws depend on `n` only),
    half the memory of numpy's int64 for the permutation every rank holds, 4 bytes per training sequence."""
    order = np.arange(n, dtype=np.int32 if n <= np.iinfo(np.int32).max else np.int64)
    rng.shuffle(order)
    return order


def dropout_seed(seed: int, epoch: int, step: int, slot: int) -> int:
    """The dropout seed of the sequence in `slot` of global batch `step` of `epoch` (layout-independent)."""
    return int(np.random.SeedSequence([seed, epoch, step, slot]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class GlobalBatchLoader:
    def __init__(self, dataset, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        assert global_batch_size % dp_size == 0 and 0 <= dp_rank < dp_size
        assert len(dataset) >= global_batch_size, "fewer sequences than one global batch"
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.step = 0  # global batches already taken in this epoch
        self._perm: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_size

    def _order(self) -> np.ndarray:
        if self._perm is None:
            n = len(self.dataset)
            # A blend of sources (`orders_itself`) is read in its own order, which keeps each batch's proportions.
            shuffle = self.shuffle and not getattr(self.dataset, "orders_itself", False)
            self._perm = permutation(n, np.random.default_rng([self.seed, self.epoch])) if shuffle else np.arange(n)
        return self._perm

    def global_indices(self) -> np.ndarray:
        """Indices of the next global batch (all ranks), without advancing."""
        g = self.global_batch_size
        return self._order()[self.step * g : (self.step + 1) * g]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step, self._perm = self.epoch + 1, 0, None
        share = self.global_batch_size // self.dp_size
        slots = range(self.dp_rank * share, (self.dp_rank + 1) * share)
        idx = self.global_indices()[slots.start : slots.stop]
        batch = collate([self.dataset.get(int(i), self.epoch) for i in idx])
        batch["dropout_seed"] = torch.tensor([dropout_seed(self.seed, self.epoch, self.step, s) for s in slots])
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["global_batch_size"] != self.global_batch_size:
            raise ValueError(
                f"loader state was saved with seed={state['seed']}, global_batch_size={state['global_batch_size']}; "
                f"this run has seed={self.seed}, global_batch_size={self.global_batch_size}"
            )
        self.epoch, self.step, self._perm = state["epoch"], state["step"], None


def eval_batches(dataset, batch_size: int, num_batches: int, dp_rank: int = 0, dp_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Fixed validation batches in order: up to `num_batches` global batches of `batch_size`, this rank's share."""
    n = min(len(dataset), batch_size * num_batches)
    share = max(1, batch_size // dp_size)
    for start in range(0, n, share * dp_size):
        idx = list(range(start + dp_rank * share, min(start + (dp_rank + 1) * share, n)))
        if idx:
            yield collate([dataset.get(i, 0) for i in idx])
