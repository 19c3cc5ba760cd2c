"""The typed configuration of a seqpar run: the schema that `configs/` is checked against.

The dataclasses here are registered with Hydra's ConfigStore, so a YAML key or value of the wrong type is refused
while the config is composed. `validate()` then checks what types cannot: ranges, names and the relations between
sections. It runs once, at the entry point, before any work; every failure is a `ConfigError` whose text is one
line, `<field> <problem>; <fix>`, which `train.py` prints as `error: ...`.

The `DictConfig` from Hydra is converted to these dataclasses once (`to_config`) and never passed deeper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("gpt", "bert")
ACTIVATIONS = ("gelu", "gelu_tanh")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DATA_SOURCES = ("builtin", "text_files", "hf_dataset")
SP_IMPLS = ("ring", "rsa", "ulysses")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def virtual_stages(schedule: str) -> int:
    """Pipeline stages each pp rank holds under `parallel.pp_schedule` (interleaved 1F1B: two)."""
    return 2 if schedule == "interleaved_1f1b" else 1
WANDB_MODES = ("online", "offline", "disabled")
ENGINES = ("seqpar", "deepspeed")
ATTENTIONS = ("softmax", "linformer")


class ConfigError(ValueError):
    """A user-facing configuration error: `field` names the setting, the message says what is wrong and the fix."""

    exit_code = 2

    def __init__(self, field_name: str, problem: str, fix: str):
        self.field = field_name
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field_name} {problem}; {fix}")


@dataclass
class ModelConfig:
    """Architecture of a GPT (GPT-2: pre-LN, learned positions, tied head) or BERT (post-LN, MLM head) model."""

    name: str = "gpt_tiny"
    arch: str = "gpt"
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size
    vocab_size: int = 4096
    max_seq_len: int = 256
    dropout: float = 0.0  # embeddings and residual branches
    attn_dropout: float = 0.0  # attention probabilities; keep 0 for fused kernels and sp > 1
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # GPT-2 uses the tanh approximation, BERT the exact erf GELU
    type_vocab_size: int = 2  # BERT token types
    init_std: float = 0.02
    init_from: str | None = None  # a local transformers checkpoint directory to start from
    # softmax (full attention) | linformer (BERT only: keys and values projected along the sequence to
    # linformer_k rows, so attention costs T * k instead of T^2; Wang et al. 2020, as the paper combines with sp)
    attention: str = "softmax"
    linformer_k: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def causal(self) -> bool:
        return self.arch == "gpt"


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenized, and how sequences are made."""

    source: str = "builtin"  # builtin | text_files | hf_dataset
    paths: list[str] = field(default_factory=list)  # text_files: local files (globs allowed)
    sample_by: str = "paragraph"  # text_files: line | paragraph | document
    hf_name: str | None = None  # hf_dataset: a `datasets.load_dataset` name or local path
    hf_config: str | None = None
    hf_split: str = "train"
    text_column: str = "text"
    tokenizer: str | None = None  # None: train one on the corpus (cached); else a local tokenizer directory
    seq_len: int = 128
    val_fraction: float = 0.02  # documents held out for evaluation
    mlm_probability: float = 0.15  # BERT: share of tokens selected for masking (80/10/10)
    cache_dir: str | None = None  # None: $SEQPAR_CACHE or ~/.cache/seqpar
    num_proc: int = 1  # processes for datasets.map tokenization


@dataclass
class ParallelConfig:
    """The 4D mesh dp x pp x tp x sp (tp innermost). All 1 is a single process."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    sp: int = 1
    sp_impl: str = "ring"
    pp_schedule: str = "1f1b"
    microbatches: int = 4  # pipeline micro-batches per step (pp > 1)
    # Megatron's activation sharding inside tensor parallelism (its "sequence parallel", not our sp): LayerNorm,
    # dropout and residual activations hold T/tp tokens per tp rank; reduce-scatter/all-gather replace all-reduces.
    tp_shard_activations: bool = False
    timeout_s: int = 1800  # a collective that waits longer (a hung or dead peer) fails the job
    # parallel=auto: the memory planner picks dp/pp/tp/sp (and the micro-batch) that fit, fastest first.
    auto: bool = False
    devices: int | None = None  # auto: ranks to use (None: the launcher's; else the GPUs here; else the CPU cores)
    device_mem_gib: float | None = None  # auto: memory per device (None: the GPU's; on CPU, RAM / devices)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp * self.sp


@dataclass
class TrainerConfig:
    max_steps: int = 200
    global_batch_size: int = 16  # sequences per optimizer step, whatever the layout
    micro_batch_size: int | None = None  # sequences per forward on one data-parallel rank; None: all at once
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic evaluation (a final evaluation still runs)
    eval_batches: int = 4
    peak_flops: float | None = None  # per device, for MFU; None: known GPUs' peak for `precision` only
    threads: int | None = None  # torch intra-op threads; None: torch's default
    save_final: bool = True  # write <run_dir>/final_model (transformers format) at the end
    max_bad_steps: int = 3  # abort after this many non-finite losses in a row (each such step is skipped)
    engine: str = "seqpar"  # seqpar (ours, any layout) | deepspeed (ZeRO over the dp x sp ranks; tp = pp = 1)
    zero_stage: int | None = None  # deepspeed: 1 optimizer state, 2 + gradients, 3 + parameters sharded (None: 1)


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint): model, optimizer, schedule, data position, RNG."""

    dir: str | None = None  # None: <run_dir>/checkpoints
    every: int = 100  # save every N steps (0: only at the end and on SIGTERM/SIGUSR1)
    keep: int = 3  # keep the newest N complete checkpoints (0 keeps all)
    resume: str = "auto"  # auto (newest complete in dir, if any) | never | <path of a step_* directory>
    at_end: bool = True  # also save after the last step


@dataclass
class WandbConfig:
    mode: str | None = None  # None: $WANDB_MODE if set, else offline
    project: str = "seqpar"
    entity: str | None = None
    name: str | None = None  # None: <model>-<layout>, e.g. gpt_tiny-dp2-tp2-sp2-ring
    group: str | None = None  # None: the experiment (+experiment=...) or, without one, the model
    tags: list[str] = field(default_factory=list)  # added to the automatic ones (layout, sp_impl, model, arch)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    device: str = "auto"
    run_dir: str | None = None  # set from Hydra's output directory
    experiment: str | None = None  # set from Hydra's choice of +experiment=<name>


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore; `configs/config.yaml` lists it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="seqpar_schema", node=Config)
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("seqpar_tasks_per_node"):  # cluster/slurm.yaml: ranks per node of a job
        OmegaConf.register_new_resolver("seqpar_tasks_per_node", _tasks_per_node)


def _tasks_per_node(nodes: int, dp: int, pp: int, tp: int, sp: int) -> int:
    world = dp * pp * tp * sp
    if world % nodes:
        raise ConfigError("hydra.launcher.nodes", f"({nodes}) does not divide dp*pp*tp*sp = {world}",
                          "choose a node count that divides the number of ranks")
    return world // nodes


def to_config(cfg: Any) -> Config:
    """Convert a composed DictConfig to the dataclasses (once, at the entry point)."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config), type(obj)
    return obj


def _choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(field_name, f"is {value!r}, not one of {', '.join(allowed)}", f"set {field_name}=<one of those>")


def _positive(field_name: str, value: int | float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok) or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(field_name, f"is {value}, must be {bound}", f"set {field_name} to a value {bound}")


def _fraction(field_name: str, value: float, lo_open: bool = False, hi: float = 1.0) -> None:
    ok = (0.0 < value if lo_open else 0.0 <= value) and value < hi
    if not ok:
        lo = "(0" if lo_open else "[0"
        raise ConfigError(field_name, f"is {value}, must be in {lo}, {hi})", f"set {field_name} inside that range")


def validate_model(m: ModelConfig) -> None:
    _choice("model.arch", m.arch, ARCHS)
    _choice("model.activation", m.activation, ACTIVATIONS)
    for name in ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_seq_len"):
        _positive(f"model.{name}", getattr(m, name))
    if m.ffn_hidden_size is not None:
        _positive("model.ffn_hidden_size", m.ffn_hidden_size)
    if m.hidden_size % m.num_heads:
        raise ConfigError(
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
    if m.attention == "linformer":
        if m.causal:
            raise ConfigError("model.attention", f"is linformer with model.arch={m.arch}; Linformer's projection mixes "
                              "every position of the sequence, which a causal model must not see",
                              "use model.attention=linformer with BERT (model=bert_*), or softmax")
        _positive("model.linformer_k", m.linformer_k)


def validate_layout(m: ModelConfig, d: DataConfig, p: ParallelConfig) -> None:
    """The degrees must fit the model and the sequence (each failure names the values)."""
    if p.pp > 1:
        stages = p.pp * virtual_stages(p.pp_schedule)
        if m.num_layers < stages:
            raise ConfigError(
                "parallel.pp",
                f"({p.pp}) needs {stages} pipeline stages of at least one layer but model.num_layers is {m.num_layers}",
                "lower parallel.pp (interleaved_1f1b uses 2 stages per rank) or add layers",
            )
    if p.tp > 1:
        for name, value in (("num_heads", m.num_heads), ("ffn_hidden_size", m.ffn_size), ("vocab_size", m.vocab_size)):
            if value % p.tp:
                raise ConfigError(
                    "parallel.tp",
                    f"({p.tp}) does not divide model.{name} ({value}); tensor parallelism shards it evenly",
                    f"choose a parallel.tp that divides model.{name}",
                )
    if p.sp > 1:
        parts = 2 * p.sp if m.causal else p.sp
        if d.seq_len % parts:
            layout = f"causal models cut it into 2*sp = {parts} zigzag chunks" if m.causal else f"sp = {parts} chunks"
            raise ConfigError(
                "data.seq_len",
                f"({d.seq_len}) is not divisible by {parts}: {layout}",
                f"use a data.seq_len that is a multiple of {parts}",
            )
        if p.sp_impl == "ulysses" and (m.num_heads // p.tp) % p.sp:
            raise ConfigError(
                "parallel.sp",
                f"({p.sp}) does not divide the {m.num_heads // p.tp} attention heads per rank, as ulysses needs",
                "choose sp dividing model.num_heads / parallel.tp, or parallel.sp_impl=ring",
            )


def validate_engine(t: TrainerConfig, p: ParallelConfig) -> None:
    """DeepSpeed's ZeRO shards over the dp x sp ranks; tensor and pipeline parallelism stay with our engine."""
    _choice("trainer.engine", t.engine, ENGINES)
    if t.engine != "deepspeed":
        if t.zero_stage is not None:
            raise ConfigError("trainer.zero_stage", f"is {t.zero_stage} but trainer.engine is {t.engine}",
                              "add trainer.engine=deepspeed (ZeRO is DeepSpeed's) or drop trainer.zero_stage")
        return
    if t.zero_stage is not None and t.zero_stage not in (1, 2, 3):
        raise ConfigError("trainer.zero_stage", f"is {t.zero_stage}, not one of 1, 2, 3",
                          "set trainer.zero_stage=1 (optimizer state), 2 (+ gradients) or 3 (+ parameters)")
    if p.dp * p.sp == 1:
        raise ConfigError("trainer.engine", "is deepspeed with one data-parallel rank (dp * sp = 1): ZeRO has "
                          "nothing to shard over", "use parallel.dp or parallel.sp > 1, or trainer.engine=seqpar")
    for name in ("tp", "pp"):
        if getattr(p, name) > 1:
            raise ConfigError(
                f"parallel.{name}",
                f"is {getattr(p, name)} with trainer.engine=deepspeed, which shards over dp x sp only "
                "(our tensor-parallel DTensors and pipeline schedules do not fit ZeRO's flat buffers)",
                f"use parallel.{name}=1 with DeepSpeed, or trainer.engine=seqpar for this layout",
            )
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("trainer.engine", "is deepspeed but DeepSpeed is not installed",
                          "pip install -e '.[deepspeed]' (or pip install deepspeed)")


def validate_auto(p: ParallelConfig) -> None:
    """parallel=auto owns the degrees; its two settings mean nothing without it."""
    for name in ("devices", "device_mem_gib"):
        value = getattr(p, name)
        if value is None:
            continue
        if not p.auto:
            raise ConfigError(f"parallel.{name}", "is set without parallel=auto", f"add parallel=auto or drop parallel.{name}")
        _positive(f"parallel.{name}", value)
    if p.auto:
        set_degrees = [f"{n}={getattr(p, n)}" for n in ("dp", "pp", "tp", "sp") if getattr(p, n) != 1]
        if set_degrees:
            raise ConfigError(
                "parallel.auto",
                f"chooses dp/pp/tp/sp itself but {', '.join(set_degrees)} is set",
                "drop those overrides, or drop parallel=auto to set the layout by hand",
            )


def validate(cfg: Config) -> None:
    """Check everything types cannot. Raises ConfigError with one line: `<field> <problem>; <fix>`."""
    m, d, p, t = cfg.model, cfg.data, cfg.parallel, cfg.trainer
    validate_model(m)

    _choice("data.source", d.source, DATA_SOURCES)
    _choice("data.sample_by", d.sample_by, ("line", "paragraph", "document"))
    if d.source == "text_files" and not d.paths:
        raise ConfigError("data.paths", "is empty for data.source=text_files", "pass data.paths=[file1.txt,dir/*.txt]")
    if d.source == "hf_dataset" and not d.hf_name:
        raise ConfigError("data.hf_name", "is not set for data.source=hf_dataset", "pass data.hf_name=<dataset name or path>")
    _positive("data.seq_len", d.seq_len)
    if d.seq_len < 4:
        raise ConfigError("data.seq_len", f"is {d.seq_len}, too short to train on", "use data.seq_len >= 4")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            "data.seq_len",
            f"({d.seq_len}) is longer than model.max_seq_len ({m.max_seq_len}), the model's learned positions",
            f"lower data.seq_len or raise model.max_seq_len to at least {d.seq_len}",
        )
    _fraction("data.val_fraction", d.val_fraction, lo_open=True, hi=0.5)
    _fraction("data.mlm_probability", d.mlm_probability, lo_open=True)
    _positive("data.num_proc", d.num_proc)

    for name in ("dp", "pp", "tp", "sp", "microbatches", "timeout_s"):
        _positive(f"parallel.{name}", getattr(p, name))
    validate_auto(p)
    _choice("parallel.sp_impl", p.sp_impl, SP_IMPLS)
    _choice("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    validate_layout(m, d, p)
    if p.sp > 1 and m.attn_dropout > 0:
        raise ConfigError(
            "model.attn_dropout",
            f"is {m.attn_dropout} with parallel.sp={p.sp}; sequence-parallel attention uses fused kernels without it",
            "set model.attn_dropout=0 (hidden dropout model.dropout still applies)",
        )
    if m.attention == "linformer" and p.tp > 1:
        raise ConfigError("parallel.tp", f"is {p.tp} with model.attention=linformer, whose projections are shared "
                          "by all heads (tensor parallelism would split their gradients)",
                          "use parallel.sp (or dp) to spread Linformer, or model.attention=softmax")
    if p.tp_shard_activations and p.tp > 1:
        if p.pp > 1:
            raise ConfigError(
                "parallel.tp_shard_activations",
                f"is set with parallel.pp={p.pp}; pipeline stages exchange whole hidden states here",
                "drop parallel.tp_shard_activations or use parallel.pp=1",
            )
        if (d.seq_len // p.sp) % p.tp:
            raise ConfigError(
                "parallel.tp_shard_activations",
                f"cuts each rank's {d.seq_len // p.sp} tokens (data.seq_len / sp) into parallel.tp={p.tp} shards, "
                "which needs a multiple of tp",
                f"use a data.seq_len that is a multiple of {p.sp * p.tp * (2 if m.causal else 1)}",
            )

    _positive("trainer.max_steps", t.max_steps)
    _positive("trainer.global_batch_size", t.global_batch_size)
    data_ranks = p.dp
    if t.global_batch_size % data_ranks:
        raise ConfigError(
            "trainer.global_batch_size",
            f"({t.global_batch_size}) is not divisible by parallel.dp ({p.dp})",
            "make the global batch a multiple of the data-parallel degree",
        )
    per_rank = t.global_batch_size // data_ranks
    if p.pp > 1:
        if per_rank % p.microbatches:
            raise ConfigError(
                "parallel.microbatches",
                f"({p.microbatches}) does not divide the per-rank batch ({per_rank} = global_batch_size / dp)",
                "choose microbatches that divide global_batch_size / dp",
            )
        if p.microbatches < p.pp or (p.pp_schedule == "interleaved_1f1b" and p.microbatches % p.pp):
            raise ConfigError(
                "parallel.microbatches",
                f"({p.microbatches}) must be at least parallel.pp ({p.pp})"
                + (" and a multiple of it for interleaved_1f1b" if p.pp_schedule == "interleaved_1f1b" else ""),
                f"set parallel.microbatches to a multiple of {p.pp}",
            )
        if t.micro_batch_size is not None and t.micro_batch_size != per_rank // p.microbatches:
            raise ConfigError(
                "trainer.micro_batch_size",
                f"({t.micro_batch_size}) is set with parallel.pp={p.pp}; the pipeline splits the batch into "
                f"parallel.microbatches={p.microbatches}",
                "leave trainer.micro_batch_size unset and use parallel.microbatches",
            )
    if t.micro_batch_size is not None:
        _positive("trainer.micro_batch_size", t.micro_batch_size)
        if per_rank % t.micro_batch_size:
            raise ConfigError(
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
    _positive("trainer.log_every", t.log_every)
    _positive("trainer.eval_every", t.eval_every, zero_ok=True)
    _positive("trainer.eval_batches", t.eval_batches)
    if t.peak_flops is not None:
        _positive("trainer.peak_flops", t.peak_flops)
    if t.threads is not None:
        _positive("trainer.threads", t.threads)
    if t.seed < 0:
        raise ConfigError("trainer.seed", f"is {t.seed}, must be >= 0", "pass a non-negative seed")
    _positive("trainer.max_bad_steps", t.max_bad_steps)
    validate_engine(t, p)

    c = cfg.checkpoint
    _positive("checkpoint.every", c.every, zero_ok=True)
    _positive("checkpoint.keep", c.keep, zero_ok=True)
    if not c.resume:
        raise ConfigError("checkpoint.resume", "is empty", "use auto, never, or the path of a step_* checkpoint directory")

    if cfg.logger.wandb.mode is not None:
        _choice("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)
    _choice("device", cfg.device, DEVICES)
