"""ParallelMesh over gloo processes: axis order (tp innermost), groups, and reductions over dp x sp only."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar.config import ParallelConfig
from seqpar.errors import UserError
from seqpar.parallel.mesh import ParallelMesh

from .spawn import spawn


def _check(rank, world, dp, pp, sp, tp):
    mesh = ParallelMesh.from_config(ParallelConfig(dp=dp, pp=pp, sp=sp, tp=tp), torch.device("cpu"))
    assert mesh.world_size == world and mesh.rank == rank
    # Row-major over (dp, pp, sp, tp): tp innermost.
    coords = {}
    r = rank
    for axis, size in reversed(list(zip(("dp", "pp", "sp", "tp"), (dp, pp, sp, tp), strict=True))):
        coords[axis], r = r % size, r // size
    for axis in ("dp", "pp", "sp", "tp"):
        assert mesh.local_rank(axis) == coords[axis], (axis, coords)
        assert dist.get_world_size(mesh.group(axis)) == {"dp": dp, "pp": pp, "sp": sp, "tp": tp}[axis]
    assert dist.get_world_size(mesh.group("dp_sp")) == dp * sp
    assert mesh.dp_rank == coords["dp"]
    # Token counts are summed over the ranks holding different tokens (dp x sp), not over pp or tp replicas.
    total = mesh.sum_over_data(torch.tensor(float(coords["dp"] * sp + coords["sp"] + 1)))
    assert total.item() == sum(range(1, dp * sp + 1))
    assert mesh.max_over_all(float(rank)) == world - 1
    assert mesh.all_equal(7) and not mesh.all_equal(rank)


def _check_layouts(rank, world, layouts):
    for layout in layouts:
        _check(rank, world, *layout)


@pytest.mark.parametrize("layouts", [[(2, 1, 2, 1), (1, 1, 4, 1), (2, 1, 1, 2)], [(2, 1, 2, 2), (1, 2, 2, 2)]],
                         ids=["world4", "world8"])
def test_mesh_axes_and_groups(layouts):
    """(dp, pp, sp, tp) layouts of one world size, each checked in the same job."""
    world = layouts[0][0] * layouts[0][1] * layouts[0][2] * layouts[0][3]
    spawn(_check_layouts, world, layouts)


def _wrong_world(rank, world):
    try:
        ParallelMesh.from_config(ParallelConfig(sp=4), torch.device("cpu"))
    except UserError as e:
        assert e.field == "parallel" and "but 2 processes are running" in str(e)
    else:
        raise AssertionError("a layout of 4 on 2 processes was accepted")


def test_mesh_refuses_a_layout_that_does_not_match_the_world():
    spawn(_wrong_world, 2)


def test_single_process_mesh_is_the_identity():
    mesh = ParallelMesh.from_config(ParallelConfig(), torch.device("cpu"))
    t = torch.tensor(3.0)
    assert mesh.sum_over_data(t) is t and mesh.max_over_all(2.0) == 2.0 and mesh.group("sp") is None
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        ParallelMesh.from_config(ParallelConfig(sp=2), torch.device("cpu"))


def _rank_zero_first(rank, world, path):
    import os
    import types

    from seqpar.trainer.loop import check_same_data

    mesh = ParallelMesh.from_config(ParallelConfig(dp=world), torch.device("cpu"))
    with mesh.rank_zero_first():
        if rank == 0:
            with open(path, "w") as f:
                f.write("built")
        else:
            assert os.path.exists(path), "a rank ran before rank 0 finished building"

    def data(vocab):
        tok = types.SimpleNamespace(get_vocab=lambda: vocab)
        return types.SimpleNamespace(tokenizer=tok, train=[0] * 10)

    check_same_data(data({"a": 0, "b": 1}), mesh)
    try:
        check_same_data(data({"a": 0, "b": 1 + rank}), mesh)
    except UserError as e:
        assert e.field == "data.cache_dir"
    else:
        raise AssertionError("ranks with different tokenizers were accepted")


def test_rank_zero_builds_first_and_ranks_must_agree_on_data(tmp_path):
    spawn(_rank_zero_first, 3, str(tmp_path / "cache"))
