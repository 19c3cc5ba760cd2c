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


class WandbLogger:
    def __init__(self, cfg: Config, mode: str):
        import wandb

        w = cfg.logger.wandb
        self._run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=w.name,
            tags=list(w.tags),
            mode=mode,
            dir=cfg.run_dir,
            config=dataclasses.asdict(cfg),
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, record: dict[str, Any]) -> None:
        self._run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

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
