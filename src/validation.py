"""Checks of a `Config` that types cannot make: ranges, names and the relations between sections, one function per
section. `validate(cfg)` runs them once, at the entry point (`seqpar.preflight`), before any work; every failure is
a `UserError` whose text is one line, `<field> <problem>; <fix>`, which the command line prints as `error: ...`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

from seqpar.config import (
    ACTIVATIONS,
    ARCHS,
    ATTENTIONS,
    DATA_SOURCES,
    DEVICES,
    DOCUMENT_POSITIONS,
    ENGINES,
    PP_SCHEDULES,
    PRECISIONS,
    SP_IMPLS,
    WANDB_MODES,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    ParallelConfig,
    TrainerConfig,
    virtual_stages,
)
from seqpar.errors import UserError


def _choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(field_name, f"is {value!r}, not one of {', '.join(allowed)}", f"set {field_name}=<one of those>")


def _positive(field_name: str, value: int | float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok) or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if zero_ok else "> 0"
        raise UserError(field_name, f"is {value}, must be {bound}", f"set {field_name} to a value {bound}")


def _fraction(field_name: str, value: float, lo_open: bool = False, hi: float = 1.0) -> None:
    ok = (0.0 < value if lo_open else 0.0 <= value) and value < hi
    if not ok:
        lo = "(0" if lo_open else "[0"
        raise UserError(field_name, f"is {value}, must be in {lo}, {hi})", f"set {field_name} inside that range")


def validate_model(m: ModelConfig) -> None:
    _choice("model.arch", m.arch, ARCHS)
    _choice("model.activation", m.activation, ACTIVATIONS)
    for name in ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_seq_len"):
        _positive(f"model.{name}", getattr(m, name))
    if m.ffn_hidden_size is not None:
        _positive("model.ffn_hidden_size", m.ffn_hidden_size)
    if m.hidden_size % m.num_heads:
        raise UserError(
            "model.hidden_size",
            f"({m.hidden_size}) is not divisible by model.num_heads ({m.num_heads})",
            "choose num_heads that divides hidden_size",
        )
    _fraction("model.dropout", m.dropout)
    _fraction("model.attn_dropout", m.attn_dropout)
    _positive("model.layer_norm_eps", m.layer_norm_eps)
    _positive("model.init_std", m.init_std)
    _positive("model.type_vocab_size", m.type_vocab_size)
    _choice("model.attention", m.attention, ATTENTIONS)
    validate_llama_fields(m)
    if m.attention == "linformer":
        if m.causal:
            raise UserError("model.attention", f"is linformer with model.arch={m.arch}; Linformer's projection mixes "
                              "every position of the sequence, which a causal model must not see",
                              "use model.attention=linformer with BERT (model=bert_*), or softmax")
        _positive("model.linformer_k", m.linformer_k)


def validate_llama_fields(m: ModelConfig) -> None:
    """Grouped-query attention, rotary positions and q/k/v biases are Llama's (model.arch=llama); GPT and BERT keep
    their defaults."""
    if m.arch != "llama":
        defaults = ModelConfig()
        for name in ("num_kv_heads", "rope_theta", "qkv_bias"):
            if getattr(m, name) != getattr(defaults, name) and not (name == "num_kv_heads" and m.num_kv_heads == m.num_heads):
                raise UserError(f"model.{name}", f"is {getattr(m, name)} with model.arch={m.arch}, which has no such "
                                "setting (it is Llama's)", f"drop model.{name} or use model=llama_tiny (model.arch=llama)")
        if m.tie_embeddings is False:
            raise UserError("model.tie_embeddings", f"is false with model.arch={m.arch}, whose output layer is the "
                            "token embedding", "drop model.tie_embeddings (only Llama can untie them)")
        return
    if m.num_kv_heads is not None:
        _positive("model.num_kv_heads", m.num_kv_heads)
        if m.num_heads % m.num_kv_heads:
            raise UserError("model.num_kv_heads", f"({m.num_kv_heads}) does not divide model.num_heads ({m.num_heads}); "
                            "each key/value head serves an equal group of query heads",
                            "choose num_kv_heads dividing num_heads")
    _positive("model.rope_theta", m.rope_theta)
    if m.attention != "softmax":
        raise UserError("model.attention", f"is {m.attention} with model.arch=llama", "use model.attention=softmax")
    if m.head_dim % 2:
        raise UserError("model.hidden_size", f"gives an odd head size ({m.head_dim}); rotary embeddings rotate pairs "
                        "of features", "choose hidden_size / num_heads even")


def validate_data(d: DataConfig, m: ModelConfig) -> None:
    _choice("data.source", d.source, DATA_SOURCES)
    _choice("data.sample_by", d.sample_by, ("line", "paragraph", "document"))
    if d.source == "text_files" and not d.paths:
        raise UserError("data.paths", "is empty for data.source=text_files", "pass data.paths=[file1.txt,dir/*.txt]")
    if d.source == "hf_dataset" and not d.hf_name:
        raise UserError("data.hf_name", "is not set for data.source=hf_dataset", "pass data.hf_name=<dataset name or path>")
    _positive("data.seq_len", d.seq_len)
    if d.seq_len < 4:
        raise UserError("data.seq_len", f"is {d.seq_len}, too short to train on", "use data.seq_len >= 4")
    if d.seq_len > m.max_seq_len and m.arch != "llama":  # Llama's rotary positions have no table to outgrow
        raise UserError(
            "data.seq_len",
            f"({d.seq_len}) is longer than model.max_seq_len ({m.max_seq_len}), the model's learned positions",
            f"lower data.seq_len or raise model.max_seq_len to at least {d.seq_len}",
        )
    _fraction("data.val_fraction", d.val_fraction, lo_open=True, hi=0.5)
    _fraction("data.mlm_probability", d.mlm_probability, lo_open=True)
    if d.num_proc is not None:
        _positive("data.num_proc", d.num_proc)
    _positive("data.tokenizer_sample_mib", d.tokenizer_sample_mib)
    _positive("data.shard_tokens", d.shard_tokens)
    if d.streaming and d.source != "hf_dataset":
        raise UserError("data.streaming", f"is true with data.source={d.source}; only hub datasets stream",
                        "use data=hf_dataset data.streaming=true, or drop data.streaming")
    if d.sources:
        if d.source != "prepared" or d.path:
            raise UserError("data.sources", f"is set with data.source={d.source}" + (" and data.path" if d.path else ""),
                            "blend prepared directories with data=prepared data.sources=[...] and no data.path")
        for i, src in enumerate(d.sources):
            if not src.path:
                raise UserError(f"data.sources[{i}].path", "is empty", "give each source the path of a prepared directory")
            _positive(f"data.sources[{i}].weight", src.weight)
    elif d.source == "prepared" and not d.path:
        raise UserError("data.path", "is not set for data.source=prepared",
                        "pass data.path=<the --out directory of python -m seqpar.prepare> (or data.sources=[...])")
    validate_documents(d, m)


def validate_documents(d: DataConfig, m: ModelConfig) -> None:
    """Document masking and positions: for the packed token stream of GPT and Llama only."""
    if d.document_positions is not None:
        _choice("data.document_positions", d.document_positions, DOCUMENT_POSITIONS)
    if d.document_mask and m.attention != "softmax":
        raise UserError("data.document_mask", f"is true with model.attention={m.attention}, whose projected keys "
                        "mix positions of every document", "use model.attention=softmax or data.document_mask=false")
    if not m.causal and (d.document_mask or d.document_positions is not None):
        name = "data.document_mask" if d.document_mask else "data.document_positions"
        raise UserError(name, f"is set with model.arch={m.arch}, whose windows are packed and padded, not cut from "
                        "a stream of documents", f"drop {name} (GPT and Llama only)")


def validate_auto(p: ParallelConfig) -> None:
    """parallel=auto owns the degrees; its two settings mean nothing without it."""
    for name in ("devices", "device_mem_gib"):
        value = getattr(p, name)
        if value is None:
            continue
        if not p.auto:
            raise UserError(f"parallel.{name}", "is set without parallel=auto", f"add parallel=auto or drop parallel.{name}")
        _positive(f"parallel.{name}", value)
    if p.auto:
        set_degrees = [f"{n}={getattr(p, n)}" for n in ("dp", "pp", "tp", "sp") if getattr(p, n) != 1]
        if set_degrees:
            raise UserError(
                "parallel.auto",
                f"chooses dp/pp/tp/sp itself but {', '.join(set_degrees)} is set",
                "drop those overrides, or drop parallel=auto to set the layout by hand",
            )


def validate_layout(m: ModelConfig, d: DataConfig, p: ParallelConfig) -> None:
    """The degrees must fit the model and the sequence (each failure names the values)."""
    if p.pp > 1:
        stages = p.pp * virtual_stages(p.pp_schedule)
        if m.num_layers < stages:
            raise UserError(
                "parallel.pp",
                f"({p.pp}) needs {stages} pipeline stages of at least one layer but model.num_layers is {m.num_layers}",
                "lower parallel.pp (interleaved_1f1b uses 2 stages per rank) or add layers",
            )
    if p.tp > 1:
        for name, value in (("num_heads", m.num_heads), ("ffn_hidden_size", m.ffn_size), ("vocab_size", m.vocab_size)):
            if value % p.tp:
                raise UserError(
                    "parallel.tp",
                    f"({p.tp}) does not divide model.{name} ({value}); tensor parallelism shards it evenly",
                    f"choose a parallel.tp that divides model.{name}",
                )
        # Key/value heads are sharded like the query heads, or, with more tp ranks than heads, each replicated over
        # the ranks whose query heads use it (seqpar.parallel.tensor.ReplicatedKeyValue).
        if m.kv_heads % p.tp and p.tp % m.kv_heads:
            raise UserError(
                "parallel.tp",
                f"({p.tp}) neither divides nor is a multiple of model.num_kv_heads ({m.kv_heads}); tensor parallelism "
                "shards the key/value heads evenly or replicates each over tp / num_kv_heads ranks",
                "choose a parallel.tp that divides model.num_kv_heads or is a multiple of it",
            )
    if p.sp > 1:
        parts = 2 * p.sp if m.causal else p.sp
        if d.seq_len % parts:
            layout = f"causal models cut it into 2*sp = {parts} zigzag chunks" if m.causal else f"sp = {parts} chunks"
            raise UserError(
                "data.seq_len",
                f"({d.seq_len}) is not divisible by {parts}: {layout}",
                f"use a data.seq_len that is a multiple of {parts}",
            )
        if p.sp_impl == "ulysses" and (m.num_heads // p.tp) % p.sp:
            raise UserError(
                "parallel.sp",
                f"({p.sp}) does not divide the {m.num_heads // p.tp} attention heads per rank, as ulysses needs",
                "choose sp dividing model.num_heads / parallel.tp, or parallel.sp_impl=ring",
            )
    if p.ulysses is not None and p.sp_impl != "hybrid":
        raise UserError("parallel.ulysses", f"is set with parallel.sp_impl={p.sp_impl}",
                        "add parallel.sp_impl=hybrid (Ulysses groups inside a ring) or drop parallel.ulysses")
    if p.sp_impl == "hybrid":
        if p.ulysses is None:
            raise UserError("parallel.ulysses", "is not set for parallel.sp_impl=hybrid",
                            "pass parallel.ulysses=U, the ranks of each all-to-all group (those of a node)")
        _positive("parallel.ulysses", p.ulysses)
        if p.sp > 1 and p.sp % p.ulysses:
            raise UserError("parallel.ulysses", f"({p.ulysses}) does not divide parallel.sp ({p.sp})",
                            "choose a Ulysses group size that divides sp")
        if (m.num_heads // p.tp) % p.ulysses:
            raise UserError("parallel.ulysses", f"({p.ulysses}) does not divide the {m.num_heads // p.tp} attention "
                            "heads per rank", "choose parallel.ulysses dividing model.num_heads / parallel.tp")


def validate_parallel(m: ModelConfig, d: DataConfig, p: ParallelConfig) -> None:
    for name in ("dp", "pp", "tp", "sp", "microbatches", "timeout_s"):
        _positive(f"parallel.{name}", getattr(p, name))
    validate_auto(p)
    _choice("parallel.sp_impl", p.sp_impl, SP_IMPLS)
    _choice("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    validate_layout(m, d, p)
    if p.sp > 1 and m.attn_dropout > 0:
        raise UserError(
            "model.attn_dropout",
            f"is {m.attn_dropout} with parallel.sp={p.sp}; sequence-parallel attention uses fused kernels without it",
            "set model.attn_dropout=0 (hidden dropout model.dropout still applies)",
        )
    if m.attention == "linformer" and p.tp > 1:
        raise UserError("parallel.tp", f"is {p.tp} with model.attention=linformer, whose projections are shared "
                          "by all heads (tensor parallelism would split their gradients)",
                          "use parallel.sp (or dp) to spread Linformer, or model.attention=softmax")
    if p.tp_shard_activations and p.tp > 1:
        if p.pp > 1:
            raise UserError(
                "parallel.tp_shard_activations",
                f"is set with parallel.pp={p.pp}; pipeline stages exchange whole hidden states here",
                "drop parallel.tp_shard_activations or use parallel.pp=1",
            )
        if (d.seq_len // p.sp) % p.tp:
            raise UserError(
                "parallel.tp_shard_activations",
                f"cuts each rank's {d.seq_len // p.sp} tokens (data.seq_len / sp) into parallel.tp={p.tp} shards, "
                "which needs a multiple of tp",
                f"use a data.seq_len that is a multiple of {p.sp * p.tp * (2 if m.causal else 1)}",
            )


def validate_trainer(t: TrainerConfig, p: ParallelConfig) -> None:
    _positive("trainer.max_steps", t.max_steps)
    _positive("trainer.global_batch_size", t.global_batch_size)
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
        _positive("trainer.micro_batch_size", t.micro_batch_size)
        if per_rank % t.micro_batch_size:
            raise UserError(
                "trainer.micro_batch_size",
                f"({t.micro_batch_size}) does not divide the per-rank batch ({per_rank} = global_batch_size / dp)",
                "choose a micro_batch_size that divides it",
            )
    _positive("trainer.lr", t.lr)
    _fraction("trainer.min_lr_ratio", t.min_lr_ratio, hi=1.0 + 1e-9)
    _positive("trainer.warmup_steps", t.warmup_steps, zero_ok=True)
    _positive("trainer.weight_decay", t.weight_decay, zero_ok=True)
    _fraction("trainer.beta1", t.beta1)
    _fraction("trainer.beta2", t.beta2)
    _positive("trainer.eps", t.eps)
    _positive("trainer.grad_clip", t.grad_clip, zero_ok=True)
    _choice("trainer.precision", t.precision, PRECISIONS)
    if t.tiled_mlp is not None and not isinstance(t.tiled_mlp, bool):  # None: not set (off unless parallel=auto)
        _positive("trainer.tiled_mlp", t.tiled_mlp)
    if t.tiled_mlp and p.tp_shard_activations and p.tp > 1:
        raise UserError("trainer.tiled_mlp", "is set with parallel.tp_shard_activations, whose MLP output is cut into "
                        "token shards (a tile's shard is not the sequence's)", "drop one of the two")
    if t.activation_checkpointing is not None and not isinstance(t.activation_checkpointing, bool):
        _choice("trainer.activation_checkpointing", t.activation_checkpointing, ("offload",))
    _positive("trainer.log_every", t.log_every)
    _positive("trainer.eval_every", t.eval_every, zero_ok=True)
    _positive("trainer.eval_batches", t.eval_batches)
    if t.peak_flops is not None:
        _positive("trainer.peak_flops", t.peak_flops)
    if t.threads is not None:
        _positive("trainer.threads", t.threads)
    if t.seed < 0:
        raise UserError("trainer.seed", f"is {t.seed}, must be >= 0", "pass a non-negative seed")
    _positive("trainer.max_bad_steps", t.max_bad_steps)
    validate_engine(t)


def validate_engine(t: TrainerConfig) -> None:
    """The engine's own settings, whatever the layout (`validate_engine_layout` checks the layout against it)."""
    _choice("trainer.engine", t.engine, ENGINES)
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


def validate_layout_choice(cfg: Config, p: ParallelConfig) -> None:
    """Every check of `validate` that depends on the degrees, for a layout `p` that the planner (parallel=auto)
    considers in place of cfg.parallel: the parallel and trainer sections' checks, with `p` as a layout set by hand
    (parallel=auto's own settings cleared), so that a layout it chooses passes `validate`."""
    chosen = dataclasses.replace(p, auto=False, devices=None, device_mem_gib=None)
    validate_parallel(cfg.model, cfg.data, chosen)
    validate_trainer(cfg.trainer, chosen)
    validate_engine_layout(cfg.trainer, chosen)


def validate_checkpoint(c: CheckpointConfig) -> None:
    _positive("checkpoint.every", c.every, zero_ok=True)
    _positive("checkpoint.keep", c.keep, zero_ok=True)
    if not c.resume:
        raise UserError("checkpoint.resume", "is empty", "use auto, never, or the path of a step_* checkpoint directory")


def validate_logger(lg: LoggerConfig) -> None:
    if lg.wandb.mode is not None:
        _choice("logger.wandb.mode", lg.wandb.mode, WANDB_MODES)


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
    _choice("device", cfg.device, DEVICES)
