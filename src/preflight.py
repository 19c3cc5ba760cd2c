"""Preflight: everything checked before any process starts or any data is touched, once per job.

`prepare(cfg)` resolves what the config points at (an `init_from` checkpoint's architecture, `parallel=auto`'s
layout and the memory settings it turns on, the rest of those left unset as off), validates every section, checks
that data files, a tokenizer directory and enough devices are there, and finds the checkpoint to resume from. Its
result, a `Job`, is handed to the launcher and on to every rank, so no rank repeats these checks.
`preflight(config_dir, argv)` does the same for a command line, before Hydra makes a run directory, so that bad
input exits with one `error:` line and nothing started.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from seqpar.cli import compose, describe_hydra_error, fail, split_config_dir, with_config_dir
from seqpar.config import DATA_ARCH, Config, ModelConfig, memory_settings
from seqpar.data.corpus import resolve_text_files
from seqpar.data.prepared.windows import check_prepared
from seqpar.data.tokenizer import check_vocab, load_tokenizer_dir
from seqpar.errors import UserError
from seqpar.models.hf import read_checkpoint_config
from seqpar.parallel.launch import check_launched_world, launched_rank, resolve_device
from seqpar.plan.auto import choose_layout
from seqpar.torch_compat import check_torch
from seqpar.trainer.checkpoint import ResumePoint, find_resume
from seqpar.validation import validate


@dataclasses.dataclass
class Job:
    """A prepared job: the checked config and the checkpoint it continues from, with its checked meta.json (None: a
    fresh start)."""

    cfg: Config
    resume: ResumePoint | None = None


def check_devices(cfg: Config) -> None:
    """A job started here needs one GPU per process on CUDA."""
    world = cfg.parallel.world_size
    if resolve_device(cfg.device).type == "cuda" and launched_rank() is None and world > torch.cuda.device_count():
        raise UserError(
            "parallel",
            f"dp*pp*tp*sp = {world} processes need {world} GPUs but {torch.cuda.device_count()} are visible",
            "lower the degrees, launch across nodes with torchrun/srun, or use device=cpu",
        )


def model_config(cfg: Config) -> ModelConfig:
    """The architecture to build: `model.init_from`'s (the checkpoint fixes it; dropout stays as configured for
    training), or the configured one."""
    if not cfg.model.init_from:
        return cfg.model
    ckpt = read_checkpoint_config(cfg.model.init_from)
    return dataclasses.replace(ckpt, dropout=cfg.model.dropout, attn_dropout=cfg.model.attn_dropout,
                               init_from=cfg.model.init_from)


def prepare(cfg: Config) -> Job:
    """Check the config and what it points at; raises UserError (one line) for bad input.

    Cheap and free of side effects: it reads metadata (a checkpoint's, a tokenizer's), never a corpus or weights.
    """
    check_torch()  # the private torch APIs seqpar calls are there
    cfg.model = model_config(cfg)
    validate(cfg, layout=not cfg.parallel.auto)  # parallel=auto checks each layout it considers
    if cfg.parallel.auto:  # the layout, and any memory settings left unset that it takes to fit
        cfg = choose_layout(cfg)
        validate(cfg)
    cfg.trainer = memory_settings(cfg.trainer)  # those still unset: off
    if cfg.data.source == "text_files":
        resolve_text_files(cfg.data.paths)
    if cfg.data.source == "prepared":
        for path in [s.path for s in cfg.data.sources] or [cfg.data.path]:
            check_prepared(Path(path), DATA_ARCH[cfg.model.arch], cfg.model.vocab_size)
    if cfg.data.tokenizer and cfg.data.source != "prepared":
        check_vocab(load_tokenizer_dir(cfg.data.tokenizer, DATA_ARCH[cfg.model.arch]), cfg.model.vocab_size)
    check_devices(cfg)
    check_launched_world(cfg.parallel.world_size)
    resume = None
    if cfg.run_dir is not None or cfg.checkpoint.dir:
        resume = find_resume(cfg)  # complete, and fits this model, batch and data settings
    return Job(cfg, resume)


def preflight(config_dir: str | Path, argv: list[str]) -> Job | None:
    """Compose and prepare a command line before Hydra runs, so a bad input exits with one line and nothing is
    started; returns the prepared job for Hydra's job to use, or None where it was skipped.

    A user's own config directory counts as Hydra will read it: `--config-dir DIR` / `-cd DIR` and
    `hydra.searchpath=[...]`. Skipped when other Hydra flags are present (--multirun sweeps, --cfg, --help, and
    --config-name, whose primary config Hydra looks up before a search path override could add its directory):
    Hydra handles those itself and the job still prepares itself before it trains.
    """
    split = split_config_dir(argv)
    if split is None:
        return None
    user_dir, overrides = split
    try:
        if user_dir is not None:
            overrides = with_config_dir(overrides, user_dir)
        return prepare(compose(config_dir, overrides, with_run_dir=True))
    except UserError as e:
        fail(str(e))
    except Exception as e:  # Hydra/OmegaConf composition errors
        fail(describe_hydra_error(e))
