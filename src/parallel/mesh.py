"""ParallelMesh: the one object that owns the layout dp x pp x tp x sp and every process group.

Code that needs to know where it runs (the loader's data-parallel rank, which rank writes metrics, what to reduce
over) asks the mesh it is handed; nothing reads globals. A single process is a mesh of size 1 with no process
groups, and every reduction is then the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.config import ConfigError, ParallelConfig


@dataclass
class ParallelMesh:
    dp: int = 1
    pp: int = 1
    tp: int = 1
    sp: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_config(cls, p: ParallelConfig, device: torch.device) -> ParallelMesh:
        if p.world_size != 1:
            raise ConfigError(
                "parallel",
                f"asks for {p.world_size} processes (dp={p.dp} pp={p.pp} tp={p.tp} sp={p.sp}); this version trains on one process",
                "set parallel.dp=1 parallel.pp=1 parallel.tp=1 parallel.sp=1",
            )
        return cls(p.dp, p.pp, p.tp, p.sp, rank=0, device=device)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp * self.sp

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (the loader reads the dp_rank-th share)."""
        return 0

    @property
    def is_logging_rank(self) -> bool:
        """The rank that writes metrics and shows progress."""
        return self.rank == 0

    def sum_over_data(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the dp x sp ranks that hold different tokens (token counts, loss sums)."""
        return t

    def max_over_all(self, value: float) -> float:
        """Maximum over every rank (peak memory)."""
        return value
