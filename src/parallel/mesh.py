"""ParallelMesh: the one object that owns the layout dp x pp x sp x tp and every process group.

Code that needs to know where it runs (the loader's data-parallel rank, which rank writes metrics, what to reduce
over) asks the mesh it is handed; nothing reads globals. With more than one process the mesh is a torch DeviceMesh
with named axes in the order dp, pp, sp, tp (tp innermost, so tensor-parallel peers are neighbours), plus the
flattened `dp_sp` axis over which gradients and token counts are summed (sp ranks hold different tokens of the same
sequences and replicated parameters). A single process is a mesh of size 1 with no process groups, and every
reduction is then the identity.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from seqpar.config import MeshShape, ParallelConfig
from seqpar.errors import UserError
from seqpar.torch_compat import flatten_axes

AXES = ("dp", "pp", "sp", "tp")


@dataclass
class ParallelMesh(MeshShape):
    """The degrees (`MeshShape`), this process's rank and device, and the DeviceMesh that owns every group."""

    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    device_mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh when world_size > 1
    ulysses: int = 1  # two-level sp: the Ulysses groups' size (the sp chunk layout depends on it)

    @classmethod
    def from_config(cls, p: ParallelConfig, device: torch.device) -> ParallelMesh:
        """The mesh for this process. More than one process needs torch.distributed initialised first."""
        if p.world_size == 1:
            return cls(device=device)
        if not dist.is_initialized():
            raise RuntimeError(
                f"a mesh of {p.world_size} processes needs torch.distributed initialised; "
                "start the job with seqpar.parallel.launch.launch (train.py does)"
            )
        world = dist.get_world_size()
        if world != p.world_size:
            raise UserError(
                "parallel",
                f"dp*pp*tp*sp = {p.dp}*{p.pp}*{p.tp}*{p.sp} = {p.world_size} but {world} processes are running",
                f"choose degrees whose product is {world}, or launch {p.world_size} processes",
            )
        hybrid = p.sp_impl == "hybrid" and p.sp > 1
        if hybrid:  # sp = ring x ulysses, Ulysses groups of adjacent ranks (within a node)
            shape, names = (p.dp, p.pp, p.sp // p.ulysses, p.ulysses, p.tp), ("dp", "pp", "sp_ring", "sp_ulysses", "tp")
            mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
            flatten_axes(mesh, ("sp_ring", "sp_ulysses"), "sp")
            flatten_axes(mesh, ("dp", "sp_ring", "sp_ulysses"), "dp_sp")
        else:
            mesh = init_device_mesh(device.type, (p.dp, p.pp, p.sp, p.tp), mesh_dim_names=AXES)
            flatten_axes(mesh, ("dp", "sp"), "dp_sp")
        return cls(dp=p.dp, pp=p.pp, tp=p.tp, sp=p.sp, rank=dist.get_rank(), device=device, device_mesh=mesh,
                   ulysses=p.ulysses if hybrid else 1)

    def local_rank(self, axis: str) -> int:
        """This process's index along `axis` (dp, pp, sp, tp or dp_sp)."""
        return 0 if self.device_mesh is None else self.device_mesh.get_local_rank(axis)

    def group(self, axis: str):
        """The process group of `axis` (None for a single process)."""
        return None if self.device_mesh is None else self.device_mesh.get_group(axis)

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (the loader reads the dp_rank-th share)."""
        return self.local_rank("dp")

    @property
    def is_logging_rank(self) -> bool:
        """The rank that writes metrics and shows progress."""
        return self.rank == 0

    def sum_over_data(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the dp x sp ranks that hold different tokens (token counts, loss sums). Not differentiable."""
        if self.device_mesh is None or self.dp * self.sp == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, group=self.group("dp_sp"))
        return t

    def sum_over_all(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank (a value only some ranks hold, e.g. the last pipeline stage's loss)."""
        if self.device_mesh is None:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t

    def max_over_all(self, value: float) -> float:
        """Maximum over every rank (peak memory)."""
        if self.device_mesh is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def gather_over_all(self, value: float) -> list[float]:
        """Every rank's value, in rank order (one all-reduce of a world-sized vector)."""
        if self.device_mesh is None:
            return [value]
        t = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        t[self.rank] = value
        dist.all_reduce(t)
        return t.tolist()

    @contextlib.contextmanager
    def rank_zero_first(self):
        """Rank 0 runs the block first (building caches: corpus, tokenizer, tokenized data), then every other rank,
        which finds them built. Two ranks never build the same cache at once."""
        if self.device_mesh is None:
            yield
            return
        if self.rank != 0:
            dist.barrier()
        yield
        if self.rank == 0:
            dist.barrier()

    def all_equal(self, value: int) -> bool:
        """Whether every rank passed the same integer (a fingerprint of what must be identical everywhere)."""
        if self.device_mesh is None:
            return True
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t[0].item() == value and -t[1].item() == value
