"""Loggers: one interface, so the training loop never branches on which backends are on.

`MetricsFile` writes the run directory's `metrics.jsonl` (one JSON object per line, flushed each line);
`WandbLogger` sends the same records to Weights & Biases (offline unless configured); `NullLogger` does nothing
(the non-logging ranks and `logger.wandb.mode=disabled`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Protocol

from seqpar.config import Config


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsFile:
    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def layout_name(cfg: Config) -> str:
    """`dp2-tp2-sp2-ring`: the degrees above 1 (and the sp attention when sp > 1); `single` for one process."""
    p = cfg.parallel
    parts = [f"{axis}{getattr(p, axis)}" for axis in ("dp", "pp", "tp", "sp") if getattr(p, axis) > 1]
    if p.sp > 1:
        parts.append(p.sp_impl)
    return "-".join(parts) or "single"


def run_identity(cfg: Config) -> dict[str, Any]:
    """Name, group and tags of a run on the dashboard: runs of one experiment side by side, filterable by layout."""
    w, p = cfg.logger.wandb, cfg.parallel
    tags = [f"dp{p.dp}", f"pp{p.pp}", f"tp{p.tp}", f"sp{p.sp}", p.sp_impl, cfg.model.name, cfg.model.arch]
    if p.pp > 1:
        tags.append(p.pp_schedule)
    return {
        "name": w.name or f"{cfg.model.name}-{layout_name(cfg)}",
        "group": w.group or cfg.experiment or cfg.model.name,
        "job_type": layout_name(cfg),
        "tags": list(dict.fromkeys([*tags, *w.tags])),
    }


class WandbLogger:
    """One wandb run per job (rank 0), offline unless configured: the config, every logged record (per-rank
    memory as `peak_mem_mib/rank_<r>`), and wandb's own system metrics (CPU, GPU, memory, network)."""

    def __init__(self, cfg: Config, mode: str):
        import wandb

        w = cfg.logger.wandb
        self._run = wandb.init(
            project=w.project,
            entity=w.entity,
            mode=mode,
            dir=cfg.run_dir,
            config=dataclasses.asdict(cfg),
            settings=wandb.Settings(console="off", silent=True),
            **run_identity(cfg),
        )
        self._run.define_metric("tokens")
        for key in ("loss", "eval_loss"):
            self._run.define_metric(key, step_metric="tokens")

    def log(self, record: dict[str, Any]) -> None:
        flat = {}
        for k, v in record.items():
            if k == "step":
                continue
            if isinstance(v, list):  # per-rank values
                flat.update({f"{k.removesuffix('_per_rank')}/rank_{r}": x for r, x in enumerate(v)})
            else:
                flat[k] = v
        self._run.log(flat, step=record["step"])

    def close(self) -> None:
        self._run.finish()


class Loggers:
    """Fan a record out to several loggers."""

    def __init__(self, *loggers: Logger):
        self.loggers = loggers

    def log(self, record: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.log(record)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def wandb_mode(cfg: Config) -> str:
    """The configured mode wins; else $WANDB_MODE; else offline (never needs a network or key)."""
    return cfg.logger.wandb.mode or os.environ.get("WANDB_MODE") or "offline"


def build_loggers(cfg: Config, is_logging_rank: bool) -> Logger:
    if not is_logging_rank:
        return NullLogger()
    assert cfg.run_dir is not None
    loggers: list[Logger] = [MetricsFile(Path(cfg.run_dir) / "metrics.jsonl")]
    mode = wandb_mode(cfg)
    if mode != "disabled":
        loggers.append(WandbLogger(cfg, mode))
    return Loggers(*loggers)
