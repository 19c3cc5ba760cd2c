"""Memory planner: which layouts of N devices fit, and what they cost, before a job starts.

    python -m seqpar.plan model=bert_base data.seq_len=65536 trainer.global_batch_size=8 --gpus 64 --gpu-mem-gib 80
    python -m seqpar.plan +experiment=gpt_seq32k --gpus 8 --gpu-mem-gib 40 --json

For every dp x pp x tp x sp of N devices that the model allows (and, without pp, every micro-batch size), it
estimates the peak memory of one rank: parameters, gradients and AdamW state (per engine and ZeRO stage), the
activations autograd keeps for backward (per `parallel.sp_impl`, with and without activation checkpointing), the
logits and the loss, and the communication volume per optimizer step; then prints the layouts best first: those
that fit, by an estimated step time (the step's FLOPs at --tflops per device, stretched by the pipeline bubble,
plus the communication at --gbps), then by memory.

The estimate counts what this code keeps, in fp32 (or bf16 activations under autocast), per token of a layer:
LayerNorm inputs and outputs, q, k, v and the attention output, the MLP's two ffn-wide tensors (rsa and ulysses
add the copy of their output that o_proj reads, rsa its L/sp x L probabilities); the log-softmax and two
gradients of its size per vocabulary entry (BERT without tp or pp: at the target tokens only); plus a runtime
baseline (on CPU, measured: a rank forked with the training stack loaded, or the whole process when the job is
one process; on GPU, a CUDA context). It is checked against measured peaks of real runs in the tests (within
10%).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import subprocess
import sys
from dataclasses import dataclass

from seqpar.config import Config, virtual_stages
from seqpar.configs import CONFIG_DIR
from seqpar.errors import UserError
from seqpar.validation import validate, validate_engine, validate_layout

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


def _param_counts(cfg: Config) -> tuple[dict[str, int], int]:
    """Elements per parameter name of the whole model (tied weights once), and the layer count."""
    import torch

    from seqpar.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, "meta")
    return {n: p.numel() for n, p in model.named_parameters()}, cfg.model.num_layers


def rank_params(counts: dict[str, int], cfg: Config, pp: int, tp: int) -> float:
    """Elements held by the most loaded rank: its pipeline stage's share (first or last, with the embedding or the
    head), tensor-parallel matrices divided by tp."""
    from seqpar.models import MODELS
    from seqpar.parallel.pipeline import layer_split

    stages = pp * virtual_stages(cfg.parallel.pp_schedule) if pp > 1 else 1
    per_stage = [0.0] * pp
    split = layer_split(cfg.model.num_layers, stages)
    layout = MODELS[cfg.model.arch].layout  # which parameters tp splits, which the head holds
    for name, n in counts.items():
        if layout.tp_divides(name):
            n = n / tp
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
    # Replicated over tp: 2 LayerNorm inputs + 2 outputs; sharded by tp: q, k, v and the attention output (4h),
    # the MLP's up output and activation output (2f).
    per_token = 4 * h + (4 * h + 2 * f) / tp
    if sp > 1 and impl in ("rsa", "ulysses"):
        per_token += h / tp  # their output is not in the projections' layout: o_proj reads a contiguous copy
    if m.dropout > 0:
        per_token += 2 * h / 4  # two hidden dropout masks (1 byte per element, counted as a quarter float)
    if impl == "rsa" and sp > 1 and m.attention == "softmax":
        per_token += a * seq_len / tp  # this rank's (seq_len/sp) x seq_len probabilities (k and v stay chunks)
    return per_token * width


def estimate(cfg: Config, counts: dict[str, int], dp: int, pp: int, tp: int, sp: int, micro: int,
             runtime_mib: float) -> Estimate:
    t, m = cfg.trainer, cfg.model
    T = cfg.data.seq_len
    tokens = micro * T / sp  # tokens of one micro-batch on this rank
    params = rank_params(counts, cfg, pp, tp)
    data_ranks = dp * sp
    p_bytes = 4 * params
    if t.engine == "deepspeed":
        stage = t.zero_stage or 1
        params_b = p_bytes / data_ranks if stage >= 3 else p_bytes
        grads_b = p_bytes / data_ranks if stage >= 2 else p_bytes
        optim_b = 2 * p_bytes / data_ranks + 4 * params / data_ranks  # moments + the fp32 partition it updates
    else:
        params_b, grads_b, optim_b = p_bytes, p_bytes, 2 * p_bytes
        if data_ranks > 1:
            grads_b += min(p_bytes, 32 * MIB)  # one flat all-reduce bucket
    stages = pp * (virtual_stages(cfg.parallel.pp_schedule) if pp > 1 else 1)
    layers = math.ceil(m.num_layers / stages) * (stages // pp)
    per_layer = activation_bytes_per_token_layer(cfg, tp, sp, T, cfg.parallel.sp_impl) * tokens
    backward = 0.0
    if t.activation_checkpointing:  # block inputs kept; in backward, one block's activations rebuilt at a time
        acts = layers * tokens * m.hidden_size * 4
        backward = per_layer
    else:
        acts = layers * per_layer
    in_flight = 1
    if pp > 1:  # micro-batches whose activations a stage holds at once (measured with torch's schedules): GPipe all
        # of them; 1F1B at most pp (the first stage's warm-up); interleaved 1F1B counted as all of them (an upper bound)
        in_flight = cfg.parallel.microbatches
        if cfg.parallel.pp_schedule == "1f1b":
            in_flight = min(in_flight, pp)
    acts *= in_flight
    acts += 3 * tokens * m.hidden_size * 4  # embedding output and final LayerNorm
    vocab = m.vocab_size / tp
    # The logits, whose memory the loss (seqpar.trainer.loss) reuses for their gradient; under tp, torch's
    # loss_parallel backward holds five fp32 tensors of their size (the log-softmax, its exp, the target term, their
    # sum and the product with the gradient).
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
    if sp > 1:
        kv = 2 * act_tensor / tp
        comm += n_micro * layers * {"ulysses": 4 * act_tensor / tp / sp * (sp - 1) * 2}.get(cfg.parallel.sp_impl, kv * (sp - 1) * 2)
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
                    validate_layout(cfg.model, cfg.data, p)
                    validate_engine(dataclasses.replace(t), p)
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


def _status_mib(*fields: str) -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f) if k in fields}


def _rank_baseline_probe() -> None:
    """Print the resident memory (MiB) of a CPU rank before it holds tensors of its own: ranks are forked from a
    process with the training stack imported, so a rank holds that process's anonymous memory at once and the
    library code it touches as it runs (file-backed pages count towards a forked process only once touched)."""
    import os

    import hydra  # noqa: F401  (everything a training process imports: with its text's token ids cached, not
    import torch  #              `datasets`; of transformers, the tokenizer and the config classes it saves with)
    from transformers import BertConfig, GenerationConfig, GPT2Config, PreTrainedTokenizerFast  # noqa: F401

    import seqpar.cli  # noqa: F401
    import seqpar.data  # noqa: F401
    import seqpar.trainer.loop  # noqa: F401

    def small_step():  # touches the kernels' code
        torch.set_num_threads(1)
        layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        layer(torch.randn(2, 16, 64)).sum().backward()
        torch.optim.AdamW(layer.parameters()).step()

    read, write = os.pipe()
    if os.fork() == 0:  # a forked rank
        anon = _status_mib("RssAnon")["RssAnon"]
        small_step()
        os.write(write, f"{anon + _status_mib('RssFile')['RssFile']}".encode())
        os._exit(0)
    os.close(write)
    forked = os.read(read, 64).decode()
    small_step()  # a rank that is a process of its own (one process, or one that torchrun or srun started)
    status = _status_mib("RssAnon", "RssFile")
    print(forked, status["RssAnon"] + status["RssFile"])


@functools.cache
def runtime_baseline_mib(device: str, world: int = 2) -> float:
    """Memory a rank uses before it holds any tensor: a CUDA context on GPU; on CPU, what `_rank_baseline_probe`
    measures in a fresh process (this one may hold much more: a test runner, a notebook): a rank forked by the
    local launcher when `world` > 1, the whole process when the job is one process."""
    if device == "cuda":
        return 600.0
    probe = "from seqpar.plan import _rank_baseline_probe; _rank_baseline_probe()"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    forked, single = (float(x) for x in out.split()[-2:])
    return single if world == 1 else forked


def plan(cfg: Config, gpus: int, gpu_mem_gib: float, device: str = "cuda", tflops: float = 400.0,
         gbps: float = 100.0) -> list[Estimate]:
    """Every layout's estimate, best first: those that fit, by estimated step time, then the larger micro-batch,
    then memory."""
    counts, _ = _param_counts(cfg)
    runtime = runtime_baseline_mib(device, gpus)
    m, t = cfg.model, cfg.trainer
    total = sum(counts.values())
    flops = (6.0 * total + 12.0 * m.num_layers * m.hidden_size * cfg.data.seq_len) * t.global_batch_size * cfg.data.seq_len
    out = []
    for p, micros in layouts(cfg, gpus):
        c = dataclasses.replace(cfg, parallel=p)
        for micro in micros:
            e = estimate(c, counts, p.dp, p.pp, p.tp, p.sp, micro, runtime)
            e.fits = e.peak_mib <= gpu_mem_gib * 1024
            bubble = (p.pp - 1) / (p.microbatches + p.pp - 1) if p.pp > 1 else 0.0
            e.step_s = flops / (gpus * tflops * 1e12) / (1 - bubble) + e.comm_mib_per_step * MIB / (gbps * 1e9)
            out.append(e)
    # Among equal step times, larger micro-batches first (fewer, larger kernels run faster than the model says).
    out.sort(key=lambda e: (not e.fits, round(e.step_s, 6), -e.micro_batch_size, e.peak_mib))
    return out


def available_devices(cfg: Config) -> tuple[int, float, str]:
    """(devices, GiB per device, device type) for parallel=auto: parallel.devices, else the launcher's world size
    (torchrun, srun), else the GPUs visible here, else the CPU cores; memory: parallel.device_mem_gib, else the
    GPU's, else this machine's RAM shared by the devices."""
    import os

    import torch

    from seqpar.parallel.launch import launched_rank, resolve_device

    device = resolve_device(cfg.device).type
    p = cfg.parallel
    launched = launched_rank()
    n = p.devices or (launched.world if launched else None)
    if n is None:
        n = torch.cuda.device_count() if device == "cuda" else (os.cpu_count() or 1)
    if p.device_mem_gib:
        mem = p.device_mem_gib
    elif device == "cuda":
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        with open("/proc/meminfo") as f:  # MemTotal: the same on every rank and every run
            total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        mem = total_kib / 2**20 / n
    return n, mem, device


def choose_layout(cfg: Config) -> Config:
    """parallel=auto: the config with the fastest layout (and micro-batch) that fits the available devices, by the
    planner's estimate; says what it chose and why on stdout (rank 0 only)."""
    from seqpar.parallel.launch import launched_rank

    n, mem, device = available_devices(cfg)
    speed = {"cuda": (400.0, 100.0), "cpu": (0.1, 2.0)}[device]  # TFLOP/s, GB/s: only the ranking uses them
    rows = plan(cfg, n, mem, device, *speed)
    micro = cfg.trainer.micro_batch_size
    fitting = [e for e in rows if e.fits and (micro is None or e.pp > 1 or e.micro_batch_size == micro)]
    if not fitting:
        least = min(rows, key=lambda e: e.peak_mib, default=None)
        need = f"the smallest needs {least.peak_mib / 1024:.2f} GiB ({least.layout})" if least else "none is valid"
        raise UserError(
            "parallel.auto",
            f"finds no layout of {n} devices that fits {mem:.1f} GiB per device ({need})",
            "use more devices (parallel.devices), trainer.activation_checkpointing=true, a smaller "
            "trainer.micro_batch_size or data.seq_len",
        )
    best = fitting[0]
    p = dataclasses.replace(cfg.parallel, dp=best.dp, pp=best.pp, tp=best.tp, sp=best.sp, auto=False,
                            devices=None, device_mem_gib=None)
    t = cfg.trainer
    if best.pp == 1 and micro is None and best.micro_batch_size < t.global_batch_size // best.dp:
        t = dataclasses.replace(t, micro_batch_size=best.micro_batch_size)
    why = (f"parallel=auto: dp={best.dp} pp={best.pp} tp={best.tp} sp={best.sp}"
           + (f" micro_batch_size={best.micro_batch_size}" if best.pp == 1 else f" microbatches={p.microbatches}")
           + f" on {n} {device} devices: estimated {best.peak_mib / 1024:.2f} of {mem:.1f} GiB per device, "
           f"the shortest estimated step (then the largest micro-batch) of {len(fitting)} choices that fit "
           f"({len(rows) - len(fitting)} do not; see python -m seqpar.plan)")
    info = launched_rank()
    if info is None or info.rank == 0:  # prepare() runs once per job (the preflight's result is passed on)
        print(why, flush=True)
    return dataclasses.replace(cfg, parallel=p, trainer=t)


def main(argv: list[str] | None = None) -> None:
    from seqpar.cli import compose, describe_hydra_error, fail, with_config_dir

    ap = argparse.ArgumentParser(prog="python -m seqpar.plan", description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, required=True, help="devices (ranks) the job will have")
    ap.add_argument("--gpu-mem-gib", type=float, required=True, help="memory per device")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="what the ranks run on (runtime baseline)")
    ap.add_argument("--tflops", type=float, default=400.0, help="sustained TFLOP/s per device, for the step time")
    ap.add_argument("--gbps", type=float, default=100.0, help="GB/s per rank for collectives, for the step time")
    ap.add_argument("--json", action="store_true", help="print the estimates as JSON")
    ap.add_argument("--top", type=int, default=20, help="rows to print (the table)")
    ap.add_argument("--config-dir", "-cd", help="a directory of your own configs, searched after seqpar's (as Hydra's)")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = compose(CONFIG_DIR, with_config_dir(overrides, args.config_dir) if args.config_dir else overrides)
        validate(cfg)
    except UserError as e:
        fail(str(e))
    except Exception as e:
        fail(describe_hydra_error(e))
    if args.gpus < 1:
        fail("--gpus is below 1; pass the number of devices")
    rows = plan(cfg, args.gpus, args.gpu_mem_gib, args.device, args.tflops, args.gbps)
    if args.json:
        print(json.dumps([{**dataclasses.asdict(e), "layout": e.layout, "peak_mib": e.peak_mib} for e in rows], indent=1))
        return
    print(f"{cfg.model.name}, {cfg.data.seq_len} tokens x {cfg.trainer.global_batch_size} sequences per step, "
          f"{args.gpus} x {args.gpu_mem_gib:g} GiB, engine {cfg.trainer.engine}, sp_impl {cfg.parallel.sp_impl}"
          f"{', activation checkpointing' if cfg.trainer.activation_checkpointing else ''}")
    print(f"{'layout':<22}{'micro':>6}{'params+grads+optim':>20}{'activations':>13}{'logits':>9}{'peak GiB':>10}"
          f"{'comm MiB/step':>15}{'step s':>8}  fits")
    for e in rows[: args.top]:
        states = e.params_mib + e.grads_mib + e.optimizer_mib
        print(f"{e.layout:<22}{e.micro_batch_size:>6}{states / 1024:>19.2f}G{e.activations_mib / 1024:>12.2f}G"
              f"{e.logits_mib / 1024:>8.2f}G{e.peak_mib / 1024:>10.2f}{e.comm_mib_per_step:>15.0f}{e.step_s:>8.3f}  "
              f"{'yes' if e.fits else 'no'}")
    fitting = [e for e in rows if e.fits]
    if not fitting:
        print("nothing fits: raise --gpus, use trainer.activation_checkpointing=true, a smaller micro-batch, "
              "or trainer.engine=deepspeed", file=sys.stderr)
        raise SystemExit(1)
    best = fitting[0]
    print(f"best: parallel.dp={best.dp} parallel.pp={best.pp} parallel.tp={best.tp} parallel.sp={best.sp}"
          + (f" trainer.micro_batch_size={best.micro_batch_size}" if best.pp == 1 else "")
          + f"  ({best.peak_mib / 1024:.2f} GiB of {args.gpu_mem_gib:g}; the shortest estimated step of those that fit, then the largest micro-batch)")


if __name__ == "__main__":
    main()
