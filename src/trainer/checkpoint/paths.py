"""Where checkpoints are: the checkpoint directory, `step_*` names, the published checkpoints in it, and the two
changes to it besides a save: pruning the oldest (`checkpoint.keep`) and moving a replaced history aside."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from seqpar.config import Config
from seqpar.errors import UserError
from seqpar.trainer.checkpoint.ranks import attempt, gather, rank_and_world

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"  # written last: a directory without it is never taken for a checkpoint


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(cfg: Config) -> Path:
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir)
    if cfg.run_dir is None:
        raise UserError("checkpoint.dir", "is not set and there is no run directory", "pass checkpoint.dir=<dir>")
    return Path(cfg.run_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """The published checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def newest_if_root(path: Path) -> Path:
    """`path` itself, or the newest checkpoint in it when it is a checkpoint directory (a checkpoint.dir)."""
    if path.is_dir() and not (path / META).exists() and complete_checkpoints(path):
        return complete_checkpoints(path)[-1]
    return path


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (unpublishing each before deleting its files)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(root)[:-keep]:
        doomed = old.with_name(f".tmp-deleting-{old.name}")
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def supersede(root: Path, resumed: Path, step: int) -> None:
    """Move the checkpoints in `root` from `step` on (other than `resumed`) into `root/superseded/`, so that neither
    a save (which keeps an existing step) nor a later auto-resume mixes them with this run's new history. Nothing is
    deleted. Rank 0 moves; every rank learns the outcome together."""
    rank, _ = rank_and_world()

    def move() -> None:
        later = sorted(p for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and int(m.group(1)) >= step
                       and p.resolve() != resumed.resolve()) if root.is_dir() else []
        if not later:
            return
        aside = root / "superseded"
        aside.mkdir(exist_ok=True)
        for p in later:
            target, n = aside / p.name, 1
            while target.exists():  # superseded before, by an earlier roll-back
                target, n = aside / f"{p.name}.{n}", n + 1
            os.rename(p, target)
        print(f"warning: moved {', '.join(p.name for p in later)} into {aside}: this run continues from {resumed} "
              f"(step {step}) and its new checkpoints replace them (nothing was deleted)", file=sys.stderr, flush=True)

    errors = gather(attempt(move) if rank == 0 else None)
    if errors[0]:
        raise UserError("checkpoint.dir", f"({root}) holds checkpoints newer than {resumed.name}, which this run "
                          f"continues from, and they could not be moved aside ({errors[0]})",
                          f"move them out of {root} yourself, then run the same command again")
