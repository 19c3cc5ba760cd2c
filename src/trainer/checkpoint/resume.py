"""Which checkpoint a run continues from: `find_resume` (once per job, before any process starts: meta.json, file
sizes and compatibility) gives a `ResumePoint`; `confirm` (on the ranks, once the data is built) checks the sequences
and every file's CRC-32, passing over a damaged checkpoint under `checkpoint.resume=auto`, and `report_passed_over`
says which were passed over."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from seqpar.config import Config
from seqpar.errors import UserError
from seqpar.trainer.checkpoint.compat import check_compatible, check_same_sequences
from seqpar.trainer.checkpoint.files import damage, read_meta, verify_files
from seqpar.trainer.checkpoint.paths import checkpoint_root, complete_checkpoints, newest_if_root
from seqpar.trainer.checkpoint.ranks import rank_and_world


@dataclasses.dataclass
class ResumePoint:
    """A checkpoint to continue from, with its checked meta.json (`read_meta`), and the checkpoints passed over
    for it under `auto` with what is wrong with each (rank 0 says so once training starts)."""

    path: Path
    meta: dict
    passed_over: list[tuple[Path, str]] = dataclasses.field(default_factory=list)

    @property
    def step(self) -> int:
        return self.meta["step"]


def find_resume(cfg: Config, passed_over: list[tuple[Path, str]] | None = None) -> ResumePoint | None:
    """The checkpoint this run continues from (meta.json, file sizes and compatibility checked), or None to start
    fresh. Raises UserError when a fresh start would overwrite checkpoints or the checkpoint is unusable.

    Under `auto` a damaged checkpoint (one that fails `read_meta`, or is already in `passed_over`) is passed over
    for the newest one that passes; each newly passed over is added to `passed_over` with what is wrong with it.
    Only when every checkpoint there is damaged does `auto` refuse. A checkpoint of another model or batch is
    refused, never passed over: an older one of the same run would not fit either."""
    mode = cfg.checkpoint.resume
    if mode not in ("auto", "never"):
        path = newest_if_root(Path(mode))
        meta = read_meta(path)
        check_compatible(path, meta, cfg)
        return ResumePoint(path, meta)
    root = checkpoint_root(cfg)
    found = complete_checkpoints(root)
    if mode == "never":
        if found:
            raise UserError("checkpoint.resume", f"is never but {root} already holds checkpoints "
                              f"({found[-1].name}) that a fresh run would overwrite",
                              "use checkpoint.resume=auto to continue them, or a new hydra.run.dir / checkpoint.dir")
        return None
    passed_over = [] if passed_over is None else passed_over
    for path in reversed(found):
        if any(path == bad for bad, _ in passed_over):
            continue
        try:
            meta = read_meta(path)
        except UserError as e:
            passed_over.append((path, damage(e, path)))
            continue
        check_compatible(path, meta, cfg)
        return ResumePoint(path, meta, list(passed_over))
    if found:
        newest, why = next((bad, why) for bad, why in passed_over if bad == found[-1])
        raise UserError("checkpoint.resume", f"is auto but no checkpoint in {root} passes its checks (the newest, "
                          f"{newest.name}: {why})", f"move the damaged step_* directories out of {root} to start "
                          "fresh there, or resume from a good copy (checkpoint.resume=<step_* dir>)")
    return None


def confirm(cfg: Config, resume: ResumePoint | None,
            sequences: dict) -> tuple[ResumePoint | None, list[tuple[Path, str]]]:
    """The ranks' checks of the checkpoint `find_resume` chose (every rank calls it): the sequences this run's data
    made (`sequences`: `compat.sequences_record`'s entries) and every file's CRC-32. Under `checkpoint.resume=auto`
    a checkpoint whose files fail is passed over for the next older one that passes. Returns the checkpoint to load
    (None: a fresh start) and every checkpoint passed over for it, with what is wrong with each."""
    passed_over = list(resume.passed_over) if resume is not None else []
    while resume is not None:
        check_same_sequences(resume.path, resume.meta, sequences)
        try:
            verify_files(resume.path, resume.meta)
        except UserError as e:
            if cfg.checkpoint.resume != "auto":
                raise
            passed_over.append((resume.path, damage(e, resume.path)))  # every rank saw it (verify_files gathers)
            resume = find_resume(cfg, passed_over)
            continue
        break
    return resume, passed_over


def report_passed_over(passed_over: list[tuple[Path, str]], resume: ResumePoint | None) -> None:
    """Rank 0 says on stderr which checkpoints `auto` passed over, and why."""
    if rank_and_world()[0] != 0:
        return
    for bad, why in passed_over:
        instead = f"resuming from {resume.path.name} instead" if resume else "no other checkpoint there"
        print(f"warning: checkpoint.resume=auto passes over {bad} ({why}); {instead}", file=sys.stderr, flush=True)
