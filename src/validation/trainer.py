"""The trainer section: batch sizes against the data-parallel degree and the pipeline's micro-batches, the
optimizer, precision and memory settings, and the engine (DeepSpeed's settings, and the layouts ZeRO can shard)."""

from __future__ import annotations

import importlib.util

from seqpar.config import ENGINES, PRECISIONS, ParallelConfig, TrainerConfig
from seqpar.errors import UserError
from seqpar.validation.fields import choice, fraction, positive


def validate_trainer(t: TrainerConfig, p: ParallelConfig) -> None:
    positive("trainer.max_steps", t.max_steps)
    positive("trainer.global_batch_size", t.global_batch_size)
    data_ranks = p.dp
    if t.global_batch_size % data_ranks:
        raise UserError(
            "trainer.global_batch_size",
            f"({t.global_batch_size}) is not divisible by parallel.dp ({p.dp})",
            "make the global batch a multiple of the data-parallel degree",
        )
    per_rank = t.global_batch_size // data_ranks
    if p.pp > 1:
        if per_rank % p.microbatches:
            raise UserError(
                "parallel.microbatches",
                f"({p.microbatches}) does not divide the per-rank batch ({per_rank} = global_batch_size / dp)",
                "choose microbatches that divide global_batch_size / dp",
            )
        if p.microbatches < p.pp or (p.pp_schedule == "interleaved_1f1b" and p.microbatches % p.pp):
            raise UserError(
                "parallel.microbatches",
                f"({p.microbatches}) must be at least parallel.pp ({p.pp})"
                + (" and a multiple of it for interleaved_1f1b" if p.pp_schedule == "interleaved_1f1b" else ""),
                f"set parallel.microbatches to a multiple of {p.pp}",
            )
        if t.micro_batch_size is not None and t.micro_batch_size != per_rank // p.microbatches:
            raise UserError(
                "trainer.micro_batch_size",
                f"({t.micro_batch_size}) is set with parallel.pp={p.pp}; the pipeline splits the batch into "
                f"parallel.microbatches={p.microbatches}",
                "leave trainer.micro_batch_size unset and use parallel.microbatches",
            )
    if t.micro_batch_size is not None:
        positive("trainer.micro_batch_size", t.micro_batch_size)
        if per_rank % t.micro_batch_size:
            raise UserError(
                "trainer.micro_batch_size",
                f"({t.micro_batch_size}) does not divide the per-rank batch ({per_rank} = global_batch_size / dp)",
                "choose a micro_batch_size that divides it",
            )
    positive("trainer.lr", t.lr)
    fraction("trainer.min_lr_ratio", t.min_lr_ratio, hi=1.0 + 1e-9)
    positive("trainer.warmup_steps", t.warmup_steps, zero_ok=True)
    positive("trainer.weight_decay", t.weight_decay, zero_ok=True)
    fraction("trainer.beta1", t.beta1)
    fraction("trainer.beta2", t.beta2)
    positive("trainer.eps", t.eps)
    positive("trainer.grad_clip", t.grad_clip, zero_ok=True)
    choice("trainer.precision", t.precision, PRECISIONS)
    if t.tiled_mlp is not None and not isinstance(t.tiled_mlp, bool):  # None: not set (off unless parallel=auto)
        positive("trainer.tiled_mlp", t.tiled_mlp)
    if t.tiled_mlp and p.tp_shard_activations and p.tp > 1:
        raise UserError("trainer.tiled_mlp", "is set with parallel.tp_shard_activations, whose MLP output is cut into "
                        "token shards (a tile's shard is not the sequence's)", "drop one of the two")
    if t.activation_checkpointing is not None and not isinstance(t.activation_checkpointing, bool):
        choice("trainer.activation_checkpointing", t.activation_checkpointing, ("offload",))
    positive("trainer.log_every", t.log_every)
    positive("trainer.eval_every", t.eval_every, zero_ok=True)
    positive("trainer.eval_batches", t.eval_batches)
    if t.peak_flops is not None:
        positive("trainer.peak_flops", t.peak_flops)
    if t.threads is not None:
        positive("trainer.threads", t.threads)
    if t.seed < 0:
        raise UserError("trainer.seed", f"is {t.seed}, must be >= 0", "pass a non-negative seed")
    positive("trainer.max_bad_steps", t.max_bad_steps)
    validate_engine(t)


def validate_engine(t: TrainerConfig) -> None:
    """The engine's own settings, whatever the layout (`validate_engine_layout` checks the layout against it)."""
    choice("trainer.engine", t.engine, ENGINES)
    if t.engine != "deepspeed":
        if t.zero_stage is not None:
            raise UserError("trainer.zero_stage", f"is {t.zero_stage} but trainer.engine is {t.engine}",
                              "add trainer.engine=deepspeed (ZeRO is DeepSpeed's) or drop trainer.zero_stage")
        if t.offload_optimizer:
            raise UserError("trainer.offload_optimizer", f"is true but trainer.engine is {t.engine}",
                              "add trainer.engine=deepspeed (ZeRO-Offload is DeepSpeed's) or drop it")
        return
    if t.zero_stage is not None and t.zero_stage not in (1, 2, 3):
        raise UserError("trainer.zero_stage", f"is {t.zero_stage}, not one of 1, 2, 3",
                          "set trainer.zero_stage=1 (optimizer state), 2 (+ gradients) or 3 (+ parameters)")
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("trainer.engine", "is deepspeed but DeepSpeed is not installed",
                          "pip install -e '.[deepspeed]' (or pip install deepspeed)")


def validate_engine_layout(t: TrainerConfig, p: ParallelConfig) -> None:
    """DeepSpeed's ZeRO shards over the dp x sp ranks; tensor and pipeline parallelism stay with our engine. The
    planner runs this for each layout it considers; `validate` for the configured one."""
    if t.engine != "deepspeed":
        return
    if p.dp * p.sp == 1:
        raise UserError("trainer.engine", "is deepspeed with one data-parallel rank (dp * sp = 1): ZeRO has "
                          "nothing to shard over", "use parallel.dp or parallel.sp > 1, or trainer.engine=seqpar")
    for name in ("tp", "pp"):
        if getattr(p, name) > 1:
            raise UserError(
                f"parallel.{name}",
                f"is {getattr(p, name)} with trainer.engine=deepspeed, which shards over dp x sp only "
                "(our tensor-parallel DTensors and pipeline schedules do not fit ZeRO's flat buffers)",
                f"use parallel.{name}=1 with DeepSpeed, or trainer.engine=seqpar for this layout",
            )
