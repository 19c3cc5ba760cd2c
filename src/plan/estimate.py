"""The planner's estimate: per-rank memory, communication and step time of every layout, by arithmetic.

For every dp x pp x tp x sp of N devices that the model allows (and, without pp, every micro-batch size),
`estimate` adds up the peak memory of one rank: parameters, gradients and AdamW state (per engine and ZeRO stage),
the activations autograd keeps for backward (per `parallel.sp_impl`, with and without activation checkpointing),
the logits and the loss, and the communication volume per optimizer step. `plan` returns the layouts best first:
those that fit, by an estimated step time (the step's FLOPs at `tflops` per device, stretched by the pipeline
bubble, plus the communication at `gbps`), then by memory.

The estimate counts what this code keeps, in fp32 (or bf16 activations under autocast), per token of a layer:
LayerNorm inputs and outputs, q, k, v (k and v with the key/value heads of grouped-query attention a rank holds:
kv_heads / tp, or one replicated head where tp exceeds them) and the attention output, the MLP's two ffn-wide
tensors (SwiGLU's four) (rsa and ulysses add the copy of their output that o_proj reads, rsa its L/sp x L
probabilities); the log-softmax and two gradients of its size per vocabulary entry (BERT without tp or pp: at the
target tokens only) (document masking keeps no T x T mask: one device takes it in query tiles, recomputed in
backward, beyond `models.attention.DENSE_DOCUMENT_TOKENS`, below it one mask of at most 4 MiB a row and layer, not counted); plus
the runtime baseline, the one term that is not arithmetic: it comes from
`seqpar.plan.baseline` (on GPU a CUDA context; on CPU measured in a fresh process, with DeepSpeed's code and
bookkeeping under `trainer.engine=deepspeed`). tests/unit/test_plan.py checks
the estimate against the measured peaks of real runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from seqpar.config import Config, virtual_stages
from seqpar.errors import UserError
from seqpar.models import MODELS, build_model
from seqpar.parallel.pipeline import layer_split
from seqpar.parallel.sequence.ulysses import sent_kv_heads
from seqpar.plan.baseline import runtime_baseline_mib
from seqpar.trainer.engine import zero_bucket_elements
from seqpar.trainer.loss import linear_slab_rows
from seqpar.validation import validate_layout_choice

MIB = 2**20


@dataclass
class Estimate:
    dp: int
    pp: int
    tp: int
    sp: int
    micro_batch_size: int
    params_mib: float
    grads_mib: float
    optimizer_mib: float
    activations_mib: float
    logits_mib: float
    runtime_mib: float
    comm_mib_per_step: float
    # What the backward holds for one layer at a time, after the logits are freed (so the peak holds the larger of
    # the two): under activation checkpointing the rebuilt block's activations; rsa's (seq_len/sp) x seq_len
    # gradient of its probabilities per head.
    backward_mib: float = 0.0
    step_s: float = 0.0  # estimated: compute at --tflops (times the pipeline bubble) + communication at --gbps
    fits: bool = False

    @property
    def peak_mib(self) -> float:
        return (self.params_mib + self.grads_mib + self.optimizer_mib + self.activations_mib
                + max(self.logits_mib, self.backward_mib) + self.runtime_mib)

    @property
    def layout(self) -> str:
        return f"dp{self.dp}-pp{self.pp}-tp{self.tp}-sp{self.sp}"


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    """Key/value heads one tp rank holds: kv_heads / tp, or one (replicated, `ReplicatedKeyValue`) beyond them."""
    return max(kv_heads // tp, 1)


def _param_counts(cfg: Config) -> tuple[dict[str, int], int]:
    """Elements per parameter name of the whole model (tied weights once), and the layer count."""
    with torch.device("meta"):
        model = build_model(cfg.model, "meta")
    return {n: p.numel() for n, p in model.named_parameters()}, cfg.model.num_layers


def _largest_block(counts: dict[str, int]) -> int:
    """Elements of the largest transformer block (what ZeRO-3 gathers at a time)."""
    blocks: dict[str, int] = {}
    for name, n in counts.items():
        if name.startswith("layers."):
            block = name.split(".")[1]
            blocks[block] = blocks.get(block, 0) + n
    return max(blocks.values(), default=0)


def rank_params(counts: dict[str, int], cfg: Config, pp: int, tp: int) -> float:
    """Elements held by the most loaded rank: its pipeline stage's share (first or last, with the embedding or the
    head), tensor-parallel matrices divided by tp (key/value projections by at most their head count: beyond it each
    rank holds one whole head, `ParallelLayout.tp_parts`)."""
    stages = pp * virtual_stages(cfg.parallel.pp_schedule) if pp > 1 else 1
    per_stage = [0.0] * pp
    split = layer_split(cfg.model.num_layers, stages)
    layout = MODELS[cfg.model.arch].layout_for(cfg.model)  # which parameters tp splits, which the head holds
    for name, n in counts.items():
        n = n / layout.tp_parts(name, tp, cfg.model.kv_heads)
        if name.startswith("layers."):
            layer = int(name.split(".")[1])
            stage = next(i for i, r in enumerate(split) if layer in r)
            per_stage[stage % pp] += n
        else:  # embeddings on the first stage, the head (and a copy of a tied embedding) on the last
            head = layout.in_head(name)
            per_stage[pp - 1 if head else 0] += n
            if not head and pp > 1 and name in layout.tied.values():
                per_stage[pp - 1] += n  # the tied head's copy
    return max(per_stage)


def activation_bytes_per_token_layer(cfg: Config, tp: int, sp: int, seq_len: int, impl: str) -> float:
    """Bytes autograd keeps for one token of one transformer layer (this rank's tokens: seq_len / sp)."""
    m = cfg.model
    h, f, a = m.hidden_size, m.ffn_size, m.num_heads
    width = 2 if cfg.trainer.precision == "bf16" else 4
    kv = m.head_dim * kv_heads_per_rank(m.kv_heads, tp)  # this rank's width of k and of v (GQA: less than h / tp)
    mlp = MODELS[m.arch].layout_for(m).mlp_ffn_tensors * f  # as the model declares: SwiGLU four, GELU two
    if cfg.trainer.tiled_mlp:  # the MLP keeps only its input (ln_2's output, counted below); one tile's are transient
        mlp = 0
    # Replicated over tp: 2 LayerNorm (RMSNorm) inputs + 2 outputs; sharded by tp: q and the attention output (2h;
    # rotary positions keep only the rotated q and k), the MLP's ffn-wide tensors; k and v (2kv, already per rank).
    per_token = 4 * h + (2 * h + mlp) / tp + 2 * kv
    if sp > 1 and impl in ("rsa", "ulysses", "hybrid"):
        per_token += h / tp  # their output is not in the projections' layout: o_proj reads a contiguous copy
    if m.dropout > 0:
        per_token += 2 * h / 4  # two hidden dropout masks (1 byte per element, counted as a quarter float)
    if impl == "rsa" and sp > 1 and m.attention == "softmax":
        per_token += a * seq_len / tp  # this rank's (seq_len/sp) x seq_len probabilities (k and v stay chunks)
    return per_token * width


def estimate(cfg: Config, counts: dict[str, int], dp: int, pp: int, tp: int, sp: int, micro: int,
             runtime_mib: float, device: str = "cuda") -> Estimate:
    t, m = cfg.trainer, cfg.model
    T = cfg.data.seq_len
    tokens = micro * T / sp  # tokens of one micro-batch on this rank
    params = rank_params(counts, cfg, pp, tp)
    data_ranks = dp * sp
    p_bytes = 4 * params
    deepspeed_bf16 = t.engine == "deepspeed" and t.precision == "bf16"
    if t.engine == "deepspeed":
        stage = t.zero_stage or 1
        # DeepSpeed's bf16 casts the parameters, and so their gradients, to bf16 (the fp32 weights are the
        # optimizer's partition); our engine keeps fp32 weights under autocast.
        w_bytes = (2 if deepspeed_bf16 else 4) * params
        params_b = w_bytes / data_ranks if stage >= 3 else w_bytes
        grads_b = w_bytes / data_ranks if stage >= 2 else w_bytes
        # Adam's two moments and the fp32 partition it updates; trainer.offload_optimizer keeps them in host memory
        optim_b = 0.0 if t.offload_optimizer else 12 * params / data_ranks
        # The gradients pass through the reduce bucket our DeepSpeed config sets (the default, or the whole model
        # when smaller: `zero_bucket_elements`), allocated whole before the first gradient: fp32 under ZeRO-1 (it
        # accumulates there), the weights' width under ZeRO-2 and 3.
        bucket = zero_bucket_elements(sum(counts.values()))
        grads_b += (4 if stage == 1 else w_bytes / params) * bucket
        if stage >= 3:  # ZeRO-3 gathers a block's whole weights while it runs and prefetches the next block's
            params_b += 2 * w_bytes / params * _largest_block(counts)
    else:
        params_b, grads_b, optim_b = p_bytes, p_bytes, 2 * p_bytes
        if data_ranks > 1:
            grads_b += min(p_bytes, 32 * MIB)  # one flat all-reduce bucket
    stages = pp * (virtual_stages(cfg.parallel.pp_schedule) if pp > 1 else 1)
    layers = math.ceil(m.num_layers / stages) * (stages // pp)
    per_layer = activation_bytes_per_token_layer(cfg, tp, sp, T, cfg.parallel.sp_impl) * tokens
    backward = 0.0
    offload = t.activation_checkpointing == "offload"
    # One (tokens, hidden) tensor of the residual stream: fp32 under autocast (the weights are fp32), bf16 when
    # DeepSpeed casts the model to bf16.
    residual = tokens * m.hidden_size * (2 if deepspeed_bf16 else 4)
    if t.activation_checkpointing:  # block inputs kept; in backward, one block's activations rebuilt at a time
        # offload: the inputs wait in host memory (on a CPU, the same memory), and one is back on the device for
        # its block's backward
        acts = (1 if offload and device == "cuda" else layers) * residual
        backward = per_layer
    else:
        acts = layers * per_layer
    in_flight = 1
    if pp > 1:  # micro-batches whose activations a stage holds at once (measured with torch's schedules): GPipe all
        # of them; 1F1B at most pp (the first stage's warm-up); interleaved 1F1B counted as all of them (an upper bound)
        in_flight = cfg.parallel.microbatches
        if cfg.parallel.pp_schedule == "1f1b":
            in_flight = min(in_flight, pp)
    acts *= 1 if offload else in_flight
    # Besides the blocks, at most two residual tensors at once: the final norm's input at the end of forward, then
    # in backward the gradient flowing into a block and the one it makes; without checkpointing also the
    # embedding's output (with checkpointing it is the first block's saved input, counted or offloaded with them).
    acts += (2 if t.activation_checkpointing else 3) * residual
    vocab = m.vocab_size / tp
    head_tokens = tokens * (cfg.data.mlm_probability if m.arch == "bert" else 1.0)  # BERT predicts its targets only
    if t.fused_loss:
        # The output layer and the loss a slab at a time (seqpar.trainer.loss.linear_loss_sum): the slab's fp32
        # logits, turned into their gradient in place (and, under bf16, its bf16 copy), the weight's fp32 gradient,
        # computed in forward and held until backward, and the features' gradient; under bf16 also the weight's
        # bf16 copy and the bf16 buffer of a slab's share of its gradient.
        bf16 = t.precision == "bf16"
        rows = min(head_tokens, linear_slab_rows(int(vocab), device))
        logits = (rows * vocab * (6 if bf16 else 4) + vocab * m.hidden_size * 4
                  + head_tokens * m.hidden_size * (2 if bf16 else 4) + (vocab * m.hidden_size * 4 if bf16 else 0))
    else:
        # The logits, whose memory the loss (seqpar.trainer.loss) reuses for their gradient; under tp, torch's
        # loss_parallel backward holds five fp32 tensors of their size (the log-softmax, its exp, the target term,
        # their sum and the product with the gradient).
        logits = tokens * vocab * (2 if t.precision == "bf16" else 4) if tp == 1 else 5 * tokens * vocab * 4
        if m.arch == "bert" and tp == 1 and pp == 1:  # the trainer runs BERT's head at the target tokens only
            logits *= cfg.data.mlm_probability
    if pp > 1 and cfg.parallel.pp_schedule != "1f1b":  # the last stage runs every forward before any backward
        logits *= in_flight
    comm = 0.0
    if data_ranks > 1:
        comm += 2 * p_bytes * (data_ranks - 1) / data_ranks
    act_tensor = tokens * m.hidden_size * 4
    n_micro = (t.global_batch_size // dp) // micro
    if tp > 1:
        comm += n_micro * layers * 4 * 2 * act_tensor * (tp - 1) / tp  # 2 all-reduces forward, 2 backward
        copies = tp // min(tp, m.kv_heads)
        if copies > 1:  # once per step: the key/value projections' gradients summed over the ranks sharing a head
            kv_rows = m.head_dim * kv_heads_per_rank(m.kv_heads, tp)
            comm += layers * 2 * kv_rows * (m.hidden_size + m.qkv_bias) * 4 * 2 * (copies - 1) / copies
    if sp > 1:
        # ring and rsa pass k and v (the rank's key/value heads: GQA divides the bytes by heads / kv heads, down to
        # one replicated head where tp exceeds them); ulysses moves q and the output whole and k, v with the
        # key/value heads it sends (repeated to lcm(H_kv, sp) per rank's heads).
        kv_rank = kv_heads_per_rank(m.kv_heads, tp)
        if cfg.parallel.sp_impl == "ulysses":
            sent = sent_kv_heads(kv_rank, sp) / (m.num_heads // tp)
            comm += n_micro * layers * (2 + 2 * sent) * act_tensor / tp / sp * (sp - 1) * 2
        elif cfg.parallel.sp_impl == "hybrid":  # all-to-alls inside the Ulysses groups, a ring of sp / U across them
            u = cfg.parallel.ulysses or 1
            sent = sent_kv_heads(kv_rank, u) / (m.num_heads // tp)
            comm += n_micro * layers * (2 + 2 * sent) * act_tensor / tp / sp * (u - 1) * 2
            comm += n_micro * layers * 2 * act_tensor * sent / tp * (sp // u - 1) * 2
        else:
            comm += n_micro * layers * 2 * act_tensor * kv_rank / m.num_heads * (sp - 1) * 2
    if pp > 1:
        comm += n_micro * 2 * act_tensor
    if cfg.parallel.sp_impl == "rsa" and sp > 1 and m.attention == "softmax":
        # beside the saved probabilities: dP in fp32, turned into dS in place (and, in bf16, dS's bf16 copy)
        width = 4 + 2 if t.precision == "bf16" else 4
        backward += m.num_heads / tp * T * tokens * width
    return Estimate(dp, pp, tp, sp, micro, params_b / MIB, grads_b / MIB, optim_b / MIB, acts / MIB,
                    logits / MIB, runtime_mib, comm / MIB, backward / MIB)


def layouts(cfg: Config, world: int):
    """Every (dp, pp, tp, sp) of `world` ranks that the config's checks accept, with its micro-batch sizes."""

    for tp in _divisors(world):
        for pp in _divisors(world // tp):
            for sp in _divisors(world // tp // pp):
                dp = world // tp // pp // sp
                p = dataclasses.replace(cfg.parallel, dp=dp, pp=pp, tp=tp, sp=sp)
                t = cfg.trainer
                try:
                    validate_layout_choice(cfg, p)
                except UserError:
                    continue
                if t.global_batch_size % dp:
                    continue
                per_rank = t.global_batch_size // dp
                if pp > 1:
                    if per_rank % p.microbatches or p.microbatches < pp:
                        continue
                    yield p, [per_rank // p.microbatches]
                else:
                    yield p, [d for d in _divisors(per_rank)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(cfg: Config, gpus: int, gpu_mem_gib: float, device: str = "cuda", tflops: float = 400.0,
         gbps: float = 100.0) -> list[Estimate]:
    """Every layout's estimate, best first: those that fit, by estimated step time, then the larger micro-batch,
    then memory."""
    counts, _ = _param_counts(cfg)
    runtime = runtime_baseline_mib(device, gpus, cfg.trainer.engine)
    m, t = cfg.model, cfg.trainer
    total = sum(counts.values())
    flops = (6.0 * total + 12.0 * m.num_layers * m.hidden_size * cfg.data.seq_len) * t.global_batch_size * cfg.data.seq_len
    out = []
    for p, micros in layouts(cfg, gpus):
        c = dataclasses.replace(cfg, parallel=p)
        for micro in micros:
            e = estimate(c, counts, p.dp, p.pp, p.tp, p.sp, micro, runtime, device)
            e.fits = e.peak_mib <= gpu_mem_gib * 1024
            bubble = (p.pp - 1) / (p.microbatches + p.pp - 1) if p.pp > 1 else 0.0
            e.step_s = flops / (gpus * tflops * 1e12) / (1 - bubble) + e.comm_mib_per_step * MIB / (gbps * 1e9)
            out.append(e)
    # Among equal step times, larger micro-batches first (fewer, larger kernels run faster than the model says).
    out.sort(key=lambda e: (not e.fits, round(e.step_s, 6), -e.micro_batch_size, e.peak_mib))
    return out
