"""The typed configuration of a seqpar run: the schema that `configs/` is checked against.

The dataclasses here are registered with Hydra's ConfigStore (`seqpar.cli.register_configs`), so a YAML key or
value of the wrong type is refused while the config is composed; `seqpar.validation` then checks what types cannot.
The `DictConfig` from Hydra is converted to these dataclasses once (`seqpar.cli.to_config`) and never passed deeper.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ARCHS = ("gpt", "bert", "llama")
CAUSAL_ARCHS = ("gpt", "llama")  # decoders: causal attention, next-token targets
ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DATA_SOURCES = ("builtin", "text_files", "hf_dataset", "prepared")
SP_IMPLS = ("ring", "rsa", "ulysses", "hybrid")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def virtual_stages(schedule: str) -> int:
    """Pipeline stages each pp rank holds under `parallel.pp_schedule` (interleaved 1F1B: two)."""
    return 2 if schedule == "interleaved_1f1b" else 1
WANDB_MODES = ("online", "offline", "disabled")
ENGINES = ("seqpar", "deepspeed")
ATTENTIONS = ("softmax", "linformer")


@dataclass
class ModelConfig:
    """Architecture of a GPT (GPT-2: pre-LN, learned positions, tied head), BERT (post-LN, MLM head) or Llama
    (pre-RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention; Qwen2 with `qkv_bias`) model."""

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
    # Llama only (GPT and BERT keep these defaults; validation refuses others there):
    num_kv_heads: int | None = None  # key/value heads of grouped-query attention (None: num_heads); divides num_heads
    rope_theta: float = 10000.0  # the base of the rotary position embedding's frequencies
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2); Llama has none
    tie_embeddings: bool | None = None  # the output layer shares the token embedding (None: GPT/BERT yes, Llama no)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def tied_embeddings(self) -> bool:
        return self.tie_embeddings if self.tie_embeddings is not None else self.arch != "llama"

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def causal(self) -> bool:
        return self.arch in CAUSAL_ARCHS


@dataclass
class SourceConfig:
    """One prepared dataset of a blend (`data.sources`) and its share of every batch."""

    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenized, and how sequences are made."""

    source: str = "builtin"  # builtin | text_files | hf_dataset | prepared
    path: str | None = None  # prepared: the directory `python -m seqpar.prepare ... --out DIR` wrote
    sources: list[SourceConfig] = field(default_factory=list)  # prepared: several such directories, blended by weight
    paths: list[str] = field(default_factory=list)  # text_files: local files (globs allowed)
    sample_by: str = "paragraph"  # text_files: line | paragraph | document
    hf_name: str | None = None  # hf_dataset: a `datasets.load_dataset` name or local path
    hf_config: str | None = None
    hf_split: str = "train"
    streaming: bool = False  # hf_dataset: read the dataset as a stream while training, without preparing it
    text_column: str = "text"
    tokenizer: str | None = None  # None: train one on the corpus (cached); else a local tokenizer directory
    tokenizer_sample_mib: float = 256.0  # a trained tokenizer learns from the corpus's first this many MiB of text
    seq_len: int = 128
    val_fraction: float = 0.02  # documents held out for evaluation
    mlm_probability: float = 0.15  # BERT: share of tokens selected for masking (80/10/10)
    cache_dir: str | None = None  # None: $SEQPAR_CACHE or ~/.cache/seqpar
    num_proc: int | None = None  # tokenizing processes when preparing data (None: one per core)
    shard_tokens: int = 100_000_000  # prepare: training tokens per shard file (about 200 MB as uint16)
    # GPT/Llama: attention never crosses a document boundary of the packed stream (documents end at their
    # end-of-text token). None: on for Llama, off for GPT (`document_settings`).
    document_mask: bool | None = None
    # restart (positions count from 0 at each document) | continue (window positions). None: restart when masking.
    document_positions: str | None = None


@dataclass
class MeshShape:
    """The degrees of the 4D mesh dp x pp x tp x sp (tp innermost). All 1 is a single process."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    sp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp * self.sp


@dataclass
class ParallelConfig(MeshShape):
    """The mesh's degrees and how each parallelism runs."""

    sp_impl: str = "ring"
    ulysses: int | None = None  # sp_impl=hybrid: the Ulysses groups' size (all-to-all inside, ring across them)
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
    # true: recompute each block in backward; offload: also keep the block inputs it saves in host memory.
    # None (not set): off, unless parallel=auto turns it on to fit (`seqpar.plan.memory`); a value set is kept.
    activation_checkpointing: bool | str | None = None
    # Each MLP a tile of tokens at a time in training (recomputed tile by tile in backward): true (tiles of
    # hidden_size tokens), or the tokens per tile. None (not set): off, unless parallel=auto turns it on to fit.
    tiled_mlp: bool | int | None = None
    # The output layer and the loss a slab of tokens at a time, never the whole logits (trainer/loss.py)
    fused_loss: bool = True
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic evaluation (a final evaluation still runs)
    eval_batches: int = 4
    peak_flops: float | None = None  # per device, for MFU; None: known GPUs' peak for `precision` only
    threads: int | None = None  # torch intra-op threads; None: torch's default
    save_final: bool = True  # write <run_dir>/final_model (transformers format) at the end
    max_bad_steps: int = 3  # abort after this many non-finite losses in a row (each such step is skipped)
    engine: str = "seqpar"  # seqpar (ours, any layout) | deepspeed (ZeRO over the dp x sp ranks; tp = pp = 1)
    zero_stage: int | None = None  # deepspeed: 1 optimizer state, 2 + gradients, 3 + parameters sharded (None: 1)
    # deepspeed: AdamW's moments and fp32 weights live in host memory and its update runs there (ZeRO-Offload)
    offload_optimizer: bool = False


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


# The data each architecture trains on, as `seqpar.data` names it by `model.arch`: "gpt" is the causal-LM data
# (byte-level BPE, a packed token stream, next-token targets), "bert" the MLM windows. Llama trains on GPT's.
DATA_ARCH = {"gpt": "gpt", "bert": "bert", "llama": "gpt"}


DOCUMENT_POSITIONS = ("restart", "continue")


def document_settings(d: DataConfig, m: ModelConfig) -> tuple[bool, str]:
    """(data.document_mask, data.document_positions) with their defaults resolved for `m`'s architecture: masking
    on for Llama (off for GPT and BERT), positions restarting at each document when masking."""
    mask = d.document_mask if d.document_mask is not None else m.arch == "llama"
    positions = d.document_positions or ("restart" if mask else "continue")
    return mask, positions


def memory_settings(t: TrainerConfig) -> TrainerConfig:
    """`t` with the memory settings nobody set (None: trainer.activation_checkpointing, trainer.tiled_mlp) off, as
    a run without parallel=auto has them, or one whose layout fit without them."""
    off = {name: False for name in ("activation_checkpointing", "tiled_mlp") if getattr(t, name) is None}
    return dataclasses.replace(t, **off)


def data_view(cfg: Config) -> Config:
    """`cfg` as `seqpar.data` reads it: the document settings resolved (`document_settings`) and `model.arch`
    replaced by the data it trains on (`DATA_ARCH`)."""
    mask, positions = document_settings(cfg.data, cfg.model)
    data = dataclasses.replace(cfg.data, document_mask=mask, document_positions=positions)
    arch = DATA_ARCH.get(cfg.model.arch, cfg.model.arch)
    return dataclasses.replace(cfg, data=data, model=dataclasses.replace(cfg.model, arch=arch))
