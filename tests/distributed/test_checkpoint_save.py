"""A checkpoint save that fails on one rank fails on every rank at once (2 gloo processes), never leaving the others
waiting in a collective until `parallel.timeout_s`; the ranks then go on together and the next save works."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from seqpar.config import Config
from seqpar.trainer.checkpoint import CheckpointManager, SaveFailed, TrainState, manager, training_states

from .spawn import spawn

TIMEOUT_S = 60  # the process group's timeout: a rank left waiting would fail only after this


class _Tokenizer:
    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "b": 1}

    def save_pretrained(self, out: str) -> None:
        Path(out).mkdir()
        (Path(out) / "tokenizer.json").write_text("{}")


class _Record:
    """A stateful object whose state is a small record (the loader's position, the schedule's)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def _manager(root: Path, step: int) -> CheckpointManager:
    """A checkpoint manager as a trainer builds one: a small model and its AdamW state, the loader's position."""
    cfg = Config()
    cfg.checkpoint.dir = str(root)
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    states = training_states(model, optimizer, scheduler, _Record({"epoch": 0, "batch": step}), TrainState(step=step),
                             dist.get_rank(), torch.device("cpu"))
    return CheckpointManager(cfg, states, tokenizer=_Tokenizer(), data_record={"vocab_crc32": 0, "train_sequences": 8})


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _save_fails_on_one_rank(rank: int, world: int, root: Path, failing_rank: int, what: str) -> None:
    real = getattr(manager, what)
    if rank == failing_rank:
        setattr(manager, what, _disk_full)
    start = time.monotonic()
    with pytest.raises(SaveFailed, match=rf"^checkpoint.dir \({root}\) could not take the checkpoint of "
                                         rf"step 3 \(rank {failing_rank}: OSError: \[Errno 28\] No space"):
        _manager(root, 3).save(3)
    assert time.monotonic() - start < TIMEOUT_S / 3, "a rank waited for a peer that had failed"
    assert not (root / "step_00000003").exists() and not list(root.glob(".tmp-*"))  # nothing half-written stays
    setattr(manager, what, real)
    together = torch.ones(1)
    dist.all_reduce(together)  # both ranks carry on in step
    assert together.item() == world
    path = _manager(root, 3).save(3)
    assert path == root / "step_00000003" and (path / "meta.json").is_file()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("failing_rank,what", [(0, "_write_meta"), (1, "crc")],
                         ids=["rank 0 writing meta.json", "rank 1 checking its files"])
def test_a_failed_save_fails_every_rank_at_once(tmp_path, failing_rank, what):
    spawn(_save_fails_on_one_rank, 2, tmp_path / "checkpoints", failing_rank, what, timeout=TIMEOUT_S)
