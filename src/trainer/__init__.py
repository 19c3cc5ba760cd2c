"""Training: the loop, optimizer and schedule, metrics and loggers; `run(cfg)` trains one configured job."""

from __future__ import annotations

import dataclasses

import torch

from seqpar.config import Config, ConfigError, validate
from seqpar.parallel.mesh import ParallelMesh


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "is cuda but no CUDA device is visible", "use device=cpu or device=auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def prepare(cfg: Config) -> Config:
    """Resolve what the config points at (an init_from checkpoint's architecture) and validate everything,
    including that data files and a tokenizer directory exist and are readable.

    Cheap and side-effect free: it runs at the entry point before any process or data is touched.
    """
    if cfg.model.init_from:
        from seqpar.models.hf import read_checkpoint_config

        ckpt = read_checkpoint_config(cfg.model.init_from)
        # The checkpoint fixes the architecture; dropout stays as configured for training.
        cfg.model = dataclasses.replace(
            ckpt, dropout=cfg.model.dropout, attn_dropout=cfg.model.attn_dropout, init_from=cfg.model.init_from
        )
    validate(cfg)
    if cfg.data.source == "text_files":
        from seqpar.data.corpus import resolve_text_files

        resolve_text_files(cfg.data.paths)
    if cfg.data.tokenizer:
        from seqpar.data.tokenizer import check_vocab, load_tokenizer_dir

        check_vocab(load_tokenizer_dir(cfg.data.tokenizer, cfg.model.arch), cfg.model.vocab_size)
    ParallelMesh.from_config(cfg.parallel, torch.device("cpu"))  # layout checks
    resolve_device(cfg.device)
    return cfg


def run(cfg: Config) -> dict:
    """Train the configured job in this process; returns the last logged record."""
    from seqpar.trainer.loop import Trainer

    mesh = ParallelMesh.from_config(cfg.parallel, resolve_device(cfg.device))
    return Trainer(cfg, mesh).fit()
