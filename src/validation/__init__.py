"""Checks of a `Config` that types cannot make: ranges, names and the relations between sections, one function per
section. `validate(cfg)` runs them once, at the entry point (`seqpar.preflight`), before any work; every failure is
a `UserError` whose text is one line, `<field> <problem>; <fix>`, which the command line prints as `error: ...`.

One module per part of the config: `fields` (the checks of one value every section uses), `model`, `data`,
`parallel` (the degrees and whether a layout fits: `validate_layout`), `trainer` (with the engine), `outputs`
(checkpoints and loggers). This module holds the two entry points: `validate` for a whole config, and
`validate_layout_choice` for a layout the planner considers in place of the configured one.
"""

from __future__ import annotations

import dataclasses

from seqpar.config import DEVICES, Config, ParallelConfig
from seqpar.validation.data import validate_data
from seqpar.validation.fields import choice
from seqpar.validation.model import validate_model
from seqpar.validation.outputs import validate_checkpoint, validate_logger
from seqpar.validation.parallel import validate_parallel
from seqpar.validation.trainer import validate_engine_layout, validate_trainer


def validate(cfg: Config, layout: bool = True) -> None:
    """Check every section. Raises UserError with one line: `<field> <problem>; <fix>`. `layout=False` leaves out
    what only a layout decides for the engine (`validate_engine_layout`): the planner and `parallel=auto` choose the
    layout themselves and check each one they consider."""
    validate_model(cfg.model)
    validate_data(cfg.data, cfg.model)
    validate_parallel(cfg.model, cfg.data, cfg.parallel)
    validate_trainer(cfg.trainer, cfg.parallel)
    if layout:
        validate_engine_layout(cfg.trainer, cfg.parallel)
    validate_checkpoint(cfg.checkpoint)
    validate_logger(cfg.logger)
    choice("device", cfg.device, DEVICES)


def validate_layout_choice(cfg: Config, p: ParallelConfig) -> None:
    """Every check of `validate` that depends on the degrees, for a layout `p` that the planner (parallel=auto)
    considers in place of cfg.parallel: the parallel and trainer sections' checks, with `p` as a layout set by hand
    (parallel=auto's own settings cleared), so that a layout it chooses passes `validate`."""
    chosen = dataclasses.replace(p, auto=False, devices=None, device_mem_gib=None)
    validate_parallel(cfg.model, cfg.data, chosen)
    validate_trainer(cfg.trainer, chosen)
    validate_engine_layout(cfg.trainer, chosen)
