"""The parallel section: the degrees, parallel=auto's settings, and whether a layout fits the model and the
sequence (`validate_layout`, which the planner also uses to filter the layouts it considers)."""

from __future__ import annotations

from seqpar.config import PP_SCHEDULES, SP_IMPLS, DataConfig, ModelConfig, ParallelConfig, virtual_stages
from seqpar.errors import UserError
from seqpar.validation.fields import choice, positive


def validate_auto(p: ParallelConfig) -> None:
    """parallel=auto owns the degrees; its two settings mean nothing without it."""
    for name in ("devices", "device_mem_gib"):
        value = getattr(p, name)
        if value is None:
            continue
        if not p.auto:
            raise UserError(f"parallel.{name}", "is set without parallel=auto", f"add parallel=auto or drop parallel.{name}")
        positive(f"parallel.{name}", value)
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
        positive("parallel.ulysses", p.ulysses)
        if p.sp > 1 and p.sp % p.ulysses:
            raise UserError("parallel.ulysses", f"({p.ulysses}) does not divide parallel.sp ({p.sp})",
                            "choose a Ulysses group size that divides sp")
        if (m.num_heads // p.tp) % p.ulysses:
            raise UserError("parallel.ulysses", f"({p.ulysses}) does not divide the {m.num_heads // p.tp} attention "
                            "heads per rank", "choose parallel.ulysses dividing model.num_heads / parallel.tp")


def validate_parallel(m: ModelConfig, d: DataConfig, p: ParallelConfig) -> None:
    for name in ("dp", "pp", "tp", "sp", "microbatches", "timeout_s"):
        positive(f"parallel.{name}", getattr(p, name))
    validate_auto(p)
    choice("parallel.sp_impl", p.sp_impl, SP_IMPLS)
    choice("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
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
