"""CheckpointManager: saves and loads a set of stateful objects; it knows nothing of the trainer.

The owner hands it its states by name (`state.MODEL`, `state.OPTIM`, ...: each has `state_dict()` and
`load_state_dict()`), the tokenizer and meta.json's data record, and, under DeepSpeed, the engine, whose own files
are one more participant (`engine.save(dir)` / `engine.load(dir)` write and read `<dir>/<engine.folder>/`). A state's
tensor entries go through DCP as `<name>.<key>` (every rank its own shards, in parallel), its other entries into
meta.json under `<name>` (TRAIN's at the top level), beside what the checkpoint is of: the step, the model
architecture, the layout, the engine, the data, and the size and CRC-32 of every file.

A save is atomic: the ranks write into `.tmp-step_*`; once every rank is done, rank 0 writes the tokenizer and
`meta.json`, syncs and renames the directory to `step_*`. Each phase ends with every rank agreeing on how it went
(`_agree`), so a failure anywhere raises SaveFailed on every rank together and leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.stateful import Stateful

from seqpar.config import Config
from seqpar.trainer.checkpoint.compat import engine_record, layout
from seqpar.trainer.checkpoint.files import FORMAT, bad, crc, deepspeed_files, storage_reader
from seqpar.trainer.checkpoint.paths import META, checkpoint_root, prune, step_name, supersede
from seqpar.trainer.checkpoint.ranks import (
    attempt,
    gather,
    rank_and_world,
    single_process_quiet,
    world_barrier,
)
from seqpar.trainer.checkpoint.resume import ResumePoint, confirm, report_passed_over
from seqpar.trainer.checkpoint.state import TRAIN


class EngineFiles(Protocol):
    """An engine that saves and loads its own files inside a checkpoint directory (DeepSpeedEngine)."""

    folder: str

    def save(self, checkpoint: str) -> None: ...

    def load(self, checkpoint: str) -> None: ...


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, say). Every rank raises it at the same point of `save`, so
    none waits for a peer that gave up; nothing was published and the partial files are removed."""


def _agree(error: str | None, root: Path, step: int, tmp: Path) -> None:
    """Every rank says how its part went (a collective, so also a barrier); if any failed, all raise SaveFailed
    with the first failure, after rank 0 removed the partial checkpoint."""
    errors = gather(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    if rank_and_world()[0] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    world_barrier()  # the partial files are gone when any rank goes on (rmtree above cannot raise)
    where = f"rank {failed[0][0]}: " if len(errors) > 1 else ""
    raise SaveFailed(f"checkpoint.dir ({root}) could not take the checkpoint of step {step} ({where}{failed[0][1]})")


def _write_meta(tmp: Path, meta: dict) -> None:
    with open(tmp / META, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _split(name: str, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A state's entries: its tensors under their DCP keys, the rest as they go into meta.json."""
    tensors = {f"{name}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}


class CheckpointManager:
    """Saves the `states` into `checkpoint.dir` and loads them from a resume point (every rank calls both)."""

    def __init__(self, cfg: Config, states: dict[str, Stateful], *, tokenizer, data_record: dict,
                 engine: EngineFiles | None = None):
        self.cfg, self.states, self.engine = cfg, states, engine
        self.tokenizer, self.data_record = tokenizer, data_record

    # --- save ----------------------------------------------------------------------------------------------------

    def save(self, step: int, reason: str = "periodic") -> Path | None:
        """Write a checkpoint of `step`; returns its path, or None when that step is saved already (a resumed run
        that ends where it started). A failure anywhere raises SaveFailed on every rank together."""
        cfg = self.cfg
        rank, world = rank_and_world()
        root = checkpoint_root(cfg)
        final, tmp = root / step_name(step), root / f".tmp-{step_name(step)}"
        if final.exists():
            return None

        def prepare() -> None:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # left by an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()

        _agree(attempt(prepare) if rank == 0 else None, root, step, tmp)
        mine: dict[str, list[int]] = {}  # this rank's files: size and CRC-32
        records: dict = {}  # what meta.json holds of the states

        def write() -> None:
            tensors = {}
            for name, state in self.states.items():
                part, record = _split(name, state.state_dict())
                tensors.update(part)
                if name == TRAIN:
                    records.update(record)
                elif record:
                    records[name] = record
            with single_process_quiet():
                dcp.save(tensors, storage_writer=FileSystemWriter(str(tmp), sync_files=True),
                         no_dist=not dist.is_initialized())
            mine.update({p.name: [p.stat().st_size, crc(p)] for p in tmp.glob(f"__{rank}_*")})
            if self.engine is not None:
                self.engine.save(str(tmp))  # the engine's own files, under its folder

        _agree(attempt(write), root, step, tmp)  # every rank's files are written

        def checksum_engine_files() -> None:  # each rank a share of them
            names = sorted(str(f.relative_to(tmp)) for f in (tmp / self.engine.folder).rglob("*") if f.is_file())
            mine.update({n: [(tmp / n).stat().st_size, crc(tmp / n)] for i, n in enumerate(names)
                         if i % world == rank})

        if self.engine is not None:
            _agree(attempt(checksum_engine_files), root, step, tmp)
        files = {k: v for part in gather(mine) for k, v in part.items()}

        def publish() -> None:
            files[".metadata"] = [(tmp / ".metadata").stat().st_size, crc(tmp / ".metadata")]
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            meta = {
                "format": FORMAT,
                "step": step,
                "reason": reason,
                "model": dataclasses.asdict(cfg.model),
                "layout": layout(cfg),
                "engine": engine_record(cfg),
                "data": self.data_record,
                **records,
                "files": files,
            }
            meta["step"] = step  # the directory's (TRAIN's own step says the same)
            _write_meta(tmp, meta)
            os.rename(tmp, final)  # publish: atomic on one file system
            _fsync_dir(root)

        _agree(attempt(publish) if rank == 0 else None, root, step, tmp)
        if rank == 0:
            problem = attempt(prune, root, cfg.checkpoint.keep)  # the new checkpoint stands either way
            if problem:
                print(f"warning: checkpoint.keep: could not remove old checkpoints in {root} ({problem})",
                      file=sys.stderr, flush=True)
        return final

    # --- load ----------------------------------------------------------------------------------------------------

    def load(self, resume: ResumePoint | None) -> ResumePoint | None:
        """Load the checkpoint `resume` (from `find_resume`, once per job) into the states, after the ranks'
        checks (resume.py's `confirm`: under `checkpoint.resume=auto` a checkpoint whose files fail them is passed
        over for the next older one, and rank 0 says so). Returns what was loaded; None: a fresh start. The
        checkpoints of this run's directory newer than it are then moved aside (`paths.supersede`)."""
        resume, passed_over = confirm(self.cfg, resume, self.data_record)
        if resume is not None:
            self._restore(resume.path, resume.meta)
        report_passed_over(passed_over, resume)
        if resume is not None:
            supersede(checkpoint_root(self.cfg), resume.path, resume.step)
        return resume

    def _restore(self, path: Path, meta: dict) -> None:
        """Load the checked checkpoint `path`: the tensors through DCP (resharded to this layout; the RNG states,
        `layout_bound`, only into the same layout), the engine's files, then every state's `load_state_dict`."""
        same_layout = meta["layout"] == layout(self.cfg)
        loading = {name: state for name, state in self.states.items()
                   if same_layout or not getattr(state, "layout_bound", False)}
        templates = {name: state.state_dict() for name, state in loading.items()}
        tensors = {k: v for name, template in templates.items() for k, v in _split(name, template)[0].items()}
        try:
            with single_process_quiet():
                dcp.load(tensors, storage_reader=storage_reader(path), no_dist=not dist.is_initialized())
        except Exception as e:
            first = str(e).strip().splitlines()
            raise bad(path, f"could not be loaded into this model ({type(e).__name__}: "
                      f"{first[0][:200] if first else ''})") from None
        if self.engine is not None:
            with deepspeed_files(path, "checkpoint.resume"):
                self.engine.load(str(path))  # DeepSpeed's weights and ZeRO's optimizer partitions, weights-only
        for name, state in loading.items():
            saved = ({k: meta[k] for k in _split(name, templates[name])[1]} if name == TRAIN
                     else dict(meta.get(name, {})))
            saved.update({k: tensors[f"{name}.{k}"] for k in templates[name] if f"{name}.{k}" in tensors})
            state.load_state_dict(saved)
