"""Training: the loop, optimizer and schedule, metrics and loggers; `launch_job(cfg)` starts a
configured job on every rank it needs and `run_rank(cfg)` trains as one of them."""

from __future__ import annotations

import dataclasses

import torch

from seqpar.config import Config, ConfigError, ModelConfig, validate
from seqpar.parallel.mesh import ParallelMesh


def resolve_device(name: str) -> torch.device:
    """`device` (auto|cpu|cuda) as a torch device; on CUDA, this process's current GPU (set by the launcher)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "is cuda but no CUDA device is visible", "use device=cpu or device=auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def check_devices(cfg: Config) -> None:
    """A job started here needs one GPU per process on CUDA."""
    from seqpar.parallel.launch import launched_rank

    world = cfg.parallel.world_size
    if resolve_device(cfg.device).type == "cuda" and launched_rank() is None and world > torch.cuda.device_count():
        raise ConfigError(
            "parallel",
            f"dp*pp*tp*sp = {world} processes need {world} GPUs but {torch.cuda.device_count()} are visible",
            "lower the degrees, launch across nodes with torchrun/srun, or use device=cpu",
        )


def model_config(cfg: Config) -> ModelConfig:
    """The architecture to build: `model.init_from`'s (the checkpoint fixes it; dropout stays as configured for
    training), or the configured one."""
    if not cfg.model.init_from:
        return cfg.model
    from seqpar.models.hf import read_checkpoint_config

    ckpt = read_checkpoint_config(cfg.model.init_from)
    return dataclasses.replace(ckpt, dropout=cfg.model.dropout, attn_dropout=cfg.model.attn_dropout,
                               init_from=cfg.model.init_from)


def prepare(cfg: Config) -> Config:
    """Resolve what the config points at (an init_from checkpoint's architecture) and validate everything,
    including that data files and a tokenizer directory exist and are readable.

    Cheap and side-effect free: it runs at the entry point before any process or data is touched.
    """
    from seqpar.torch_compat import check_torch

    check_torch()  # the private torch APIs seqpar calls are there
    cfg.model = model_config(cfg)
    validate(cfg)
    if cfg.parallel.auto:
        from seqpar.plan import choose_layout

        cfg = choose_layout(cfg)
        validate(cfg)
    if cfg.data.source == "text_files":
        from seqpar.data.corpus import resolve_text_files

        resolve_text_files(cfg.data.paths)
    if cfg.data.tokenizer:
        from seqpar.data.tokenizer import check_vocab, load_tokenizer_dir

        check_vocab(load_tokenizer_dir(cfg.data.tokenizer, cfg.model.arch), cfg.model.vocab_size)
    check_devices(cfg)
    from seqpar.parallel.launch import check_launched_world

    check_launched_world(cfg.parallel.world_size)
    if cfg.run_dir is not None or cfg.checkpoint.dir:
        from seqpar.trainer.checkpoint import find_resume

        find_resume(cfg)  # the checkpoint to continue from must be complete and fit this model
    return cfg


def run_rank(cfg: Config, data=None) -> dict:
    """Train the configured job as this rank (torch.distributed already initialised when there are several);
    returns the last logged record. `data` is the built SequenceData when the launcher's parent made it."""
    from seqpar.trainer.loop import Trainer

    mesh = ParallelMesh.from_config(cfg.parallel, resolve_device(cfg.device))
    return Trainer(cfg, mesh, data).fit()


def launch_job(cfg: Config) -> None:
    """Run a prepared config on every rank it needs: in this process, as a torchrun/srun rank, or on local
    processes started here. Local CPU ranks are forked from this process after it has built the data once, so
    they start without loading anything again; the jobs of a multirun reuse the data of the previous job."""
    from seqpar.parallel.launch import launch, launched_rank, start_method

    device = resolve_device(cfg.device)
    world = cfg.parallel.world_size
    data = None
    if launched_rank() is None and (world == 1 or start_method(device.type) == "fork"):
        from seqpar.data.sequences import build_sequences_once

        data = build_sequences_once(cfg)
        if cfg.trainer.save_final:  # rank 0 writes transformers' files: import its config classes once, here
            from transformers import BertConfig, GenerationConfig, GPT2Config  # noqa: F401
        if cfg.trainer.engine == "deepspeed":  # a second or more per rank when each imports it
            from seqpar.trainer.engine import import_deepspeed

            import_deepspeed()
    launch(run_rank, world, cfg, data, device_type=device.type, timeout_s=cfg.parallel.timeout_s)
