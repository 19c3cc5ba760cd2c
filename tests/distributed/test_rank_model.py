"""Each rank builds only its part of the model: a pipeline stage holds (and reduces the gradients of) its own layers,
a tensor-parallel rank its shards, the start-up memory follows that share, and the weights are the ones a single
process initialises."""

from __future__ import annotations

import resource

import pytest
import torch

from seqpar.config import Config, ModelConfig, ParallelConfig
from seqpar.models import build_model
from seqpar.parallel.mesh import ParallelMesh
from seqpar.parallel.parallelize import materialize
from seqpar.trainer.weights import build_rank_model, initial_values

from .spawn import spawn


def _config(parallel: ParallelConfig, **model) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(**{"arch": "gpt", "num_layers": 4, "hidden_size": 32, "num_heads": 4, "vocab_size": 96,
                               "max_seq_len": 16, **model})
    cfg.parallel = parallel
    return cfg


def _whole(cfg: Config) -> dict[str, torch.Tensor]:
    """The single process's initial weights."""
    model = build_model(cfg.model, "meta")
    materialize(model, torch.device("cpu"), initial_values(cfg, model))
    return dict(model.state_dict())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _stage_holds_its_layers(rank, world):
    cfg = _config(ParallelConfig(dp=2, pp=2, microbatches=2))
    mesh = ParallelMesh.from_config(cfg.parallel, torch.device("cpu"))
    model, pipeline, reducer = build_rank_model(cfg, mesh, lambda y, t: y.sum())
    held = list(model.parameters())
    # The gradient reducer sums exactly the parameters this stage holds (not the pruned layers' ones).
    assert {id(p) for p in reducer.params} == {id(p) for p in held}
    stage = mesh.local_rank("pp")
    names = {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("layers.")}
    assert names == ({"0", "1"} if stage == 0 else {"2", "3"})
    whole = _whole(cfg)
    for name, p in model.named_parameters():  # the values one process initialises
        assert torch.equal(p, whole[name]), name
    assert sum(p.numel() for p in held) < 0.7 * sum(p.numel() for n, p in whole.items() if n != "lm_head.weight")
    if stage == 1:  # the last stage's copy of the tied weight starts equal to the embedding
        assert torch.equal(model.lm_head.weight, whole["wte.weight"])
        assert pipeline.tied is model.lm_head.weight


def test_pipeline_stage_holds_and_reduces_only_its_layers():
    spawn(_stage_holds_its_layers, 4)


# Big enough that the parameters dominate the start-up memory: ~21M parameters (84 MB), the largest 2M.
BIG = {"num_layers": 8, "hidden_size": 448, "num_heads": 4, "vocab_size": 4096, "max_seq_len": 64}


def _build_share(rank, world, layout, out):
    cfg = _config(ParallelConfig(**layout), **BIG)
    mesh = ParallelMesh.from_config(cfg.parallel, torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model, _, _ = build_rank_model(cfg, mesh, lambda y, t: y.sum())
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    held = sum(_local_bytes(p) for p in model.parameters())
    whole = sum(p.numel() * 4 for p in build_model(cfg.model, "meta").parameters())
    if rank == 0:
        torch.save({"grown": grown, "held": held, "whole": whole}, out)


def _local_bytes(p: torch.Tensor) -> int:
    t = p.to_local() if hasattr(p, "to_local") else p
    return t.numel() * t.element_size()


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2, "microbatches": 2}], ids=["tp2", "pp2"])
def test_start_up_memory_follows_the_ranks_share(tmp_path, layout):
    """The resident high-water mark grows by about the rank's share of the parameters while its model is built,
    never by the whole model (which the rank would hold if it built everything and then sharded or pruned)."""
    out = tmp_path / "mem.pt"
    spawn(_build_share, 2, layout, out)
    m = torch.load(out)
    assert m["held"] < 0.6 * m["whole"], m
    assert m["grown"] < 0.8 * m["whole"], m  # its share + one whole parameter at a time (building it all: 1.2x)
