"""What a run writes: the checkpoint and logger sections."""

from __future__ import annotations

from seqpar.config import WANDB_MODES, CheckpointConfig, LoggerConfig
from seqpar.errors import UserError
from seqpar.validation.fields import choice, positive


def validate_checkpoint(c: CheckpointConfig) -> None:
    positive("checkpoint.every", c.every, zero_ok=True)
    positive("checkpoint.keep", c.keep, zero_ok=True)
    if not c.resume:
        raise UserError("checkpoint.resume", "is empty", "use auto, never, or the path of a step_* checkpoint directory")


def validate_logger(lg: LoggerConfig) -> None:
    if lg.wandb.mode is not None:
        choice("logger.wandb.mode", lg.wandb.mode, WANDB_MODES)
