"""Checkpoints in one process: what a resume restores and where, what export reads, and what it refuses.

The runs here are gpt_tiny with a batch of 4 sequences, trained in this process (a second or two per step)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from seqpar.cli import compose
from seqpar.parallel.mesh import ParallelMesh
from seqpar.trainer import checkpoint
from seqpar.trainer.loop import Trainer

from ..conftest import CONFIG_DIR

FAST = ["trainer.threads=1", "trainer.eval_batches=1", "trainer.eval_every=0", "trainer.log_every=1",
        "trainer.save_final=false", "logger.wandb.mode=disabled", "trainer.global_batch_size=4"]


def make_trainer(run: Path, *overrides: str) -> Trainer:
    cfg = compose(CONFIG_DIR, [*FAST, *overrides])
    cfg.run_dir = str(run)
    return Trainer(cfg, ParallelMesh.from_config(cfg.parallel, torch.device("cpu")))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, cache_dir) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("saved")
    make_trainer(run, "trainer.max_steps=2", "checkpoint.every=1").fit()
    return run


def copy_run(saved: Path, dst: Path) -> Path:
    shutil.copytree(saved, dst)
    return dst


class WritesFile:
    """Unpickling this calls `open(target, "w")`: the code a crafted checkpoint file would run."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


# --- the optimizer's state goes where torch keeps it ------------------------------------------------------------

def test_loaded_adam_step_lives_where_fused_and_capturable_kernels_need_it():
    """Fused and capturable AdamW keep `step` on the parameter's device (a CPU step fails the fused CUDA kernel).
    The checkpoint's tensors arrive on the CPU; on the meta device (no GPU needed) they must end up beside the
    parameters, as `Optimizer.load_state_dict` puts them."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to("meta")
    opt = torch.optim.AdamW(model.parameters(), capturable=True)
    loaded = {f"optim.{name}.{key}": (torch.tensor(5.0) if key == "step" else torch.full(p.shape, 0.5))
              for name, p in model.named_parameters() for key in ("exp_avg", "exp_avg_sq", "step")}
    checkpoint.load_optim_state(opt, model, loaded)
    for p in model.parameters():
        state = opt.state[p]
        assert {k: v.device.type for k, v in state.items()} == {"exp_avg": "meta", "exp_avg_sq": "meta", "step": "meta"}
        assert state["step"].dtype == torch.float32


def test_loaded_adam_state_equals_the_saved_one(saved, tmp_path):
    run = copy_run(saved, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    resumed = make_trainer(run, "trainer.max_steps=2")
    assert resumed.step == 1
    reference = make_trainer(tmp_path / "ref", "trainer.max_steps=1", "checkpoint.at_end=false")
    reference.fit()
    for p, q in zip(resumed.model.parameters(), reference.model.parameters(), strict=True):
        got, want = resumed.optimizer.state[p], reference.optimizer.state[q]
        assert all(torch.equal(got[k], want[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
