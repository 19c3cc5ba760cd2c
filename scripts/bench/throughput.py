#!/usr/bin/env python
"""Training-step throughput of our single-process GPT / BERT / Llama against transformers' GPT2LMHeadModel /
BertForMaskedLM / LlamaForCausalLM at the same configuration, batch and sequence length.

A step is forward, loss, backward and an AdamW update. Ours runs as the trainer runs it (`build_model`,
`model_loss_sum`, `build_optimizer`: fused AdamW, BERT's MLM head at the target tokens only, and the fused output
layer and loss (`trainer.fused_loss`) where the trainer uses it); transformers' model gets its own loss (`labels=`) and `torch.optim.AdamW` with the same hyper-parameters. FLOP rates count the
usual model FLOPs (6 per weight per token, the head at every token, plus attention) for both. The two alternate
step by step in one process, after warm-up steps, so that both see the same machine state; the report gives the
median step time of each, their ratio, the model FLOP rate and that rate as a fraction of the machine's matmul
rate (in the step's precision), measured in the same run on square matrices with the same thread count.
`--precision bf16` runs both steps' forward and loss under bf16 autocast, as `trainer.precision=bf16` does.

    python scripts/bench/throughput.py --model gpt2_small --batch 2 --seq 512
    python scripts/bench/throughput.py --model bert_base --batch 2 --seq 512 --json out.json
    python scripts/bench/throughput.py --model llama_125m --batch 2 --seq 512
    python scripts/bench/throughput.py --model llama_125m --batch 2 --seq 512 --precision bf16
    python scripts/bench/throughput.py --model llama_125m --batch 8 --seq 1024 --precision bf16 --device cuda

Dropout is the model config's (gpt2_small and bert_base: 0.1 hidden, 0 on attention probabilities); pass
--dropout to change both models' hidden dropout. Ours draws its masks per token from the sequences' dropout seeds,
as in training; `--torch-dropout` also times the same model's steps with torch's RNG masks (alternating with its
keyed steps), to measure what the keyed masks cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def matmul_gflops(threads: int, n: int = 2048, reps: int = 10, dtype: torch.dtype = torch.float32,
                  device: torch.device | None = None) -> float:
    """The device's (default: CPU) matmul rate (GFLOP/s) in `dtype` on n x n matrices, best of `reps` (8192 x 8192
    on a GPU)."""
    torch.set_num_threads(threads)
    device = device or torch.device("cpu")
    n = n if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _batch(cfg, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; GPT: next-token labels; BERT: 15% of positions are targets (the rest -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    if cfg.causal:  # GPT, Llama
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    ids = ids[:, :-1]
    labels = torch.where(torch.rand(batch, seq, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "labels": labels}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(tcfg, device: torch.device):
    """The step's autocast (what trainer.precision=bf16 runs forward and loss under; transformers' Trainer does the
    same with bf16=True)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")


def ours(cfg, tcfg, device: torch.device):
    """Our model's step as the trainer runs it; `step(b, keyed_dropout=False)`: hidden dropout from torch's RNG
    instead of the per-token keyed masks (what a model called without `dropout_seed` does)."""
    from seqpar.models import build_model
    from seqpar.trainer.loss import output_loss_sum
    from seqpar.trainer.optim import build_optimizer
    from seqpar.trainer.step import model_loss_sum

    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    opt = build_optimizer(model, tcfg)
    targets_only = cfg.model.arch == "bert"  # as the trainer runs BERT without tp/pp: the head at targets only
    output_loss = (lambda features, labels: output_loss_sum(model, features, labels)) if tcfg.fused_loss else None

    def step(b, keyed_dropout: bool = True):
        micro = {**b, "position_ids": torch.arange(b["input_ids"].shape[1])}
        if keyed_dropout:
            micro["dropout_seed"] = torch.arange(b["input_ids"].shape[0])
        with _autocast(tcfg, device):
            loss = model_loss_sum(model, micro, device, targets_only, output_loss)
            loss = loss / (b["labels"] != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def transformers_model(cfg, tcfg, device: torch.device):
    """transformers' model of the same config (the class our model declares, `seqpar.models.hf.to_hf`) and its step."""
    from seqpar.models import build_model
    from seqpar.models.hf import to_hf

    torch.manual_seed(0)
    model = to_hf(build_model(cfg.model)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps,
                            weight_decay=tcfg.weight_decay)
    causal = cfg.model.causal

    def step(b):
        with _autocast(tcfg, device):  # GPT2LMHeadModel and LlamaForCausalLM shift labels themselves: the inputs as labels
            loss = model(input_ids=b["input_ids"], labels=b["input_ids"] if causal else b["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def run(model_name: str, batch: int, seq: int, steps: int, warmup: int, threads: int, dropout: float | None,
        torch_dropout: bool = False, precision: str = "fp32", device: str = "cpu") -> dict:
    from seqpar.cli import compose
    from seqpar.configs import CONFIG_DIR

    overrides = [f"model={model_name}", f"data.seq_len={seq}", f"trainer.global_batch_size={batch}",
                 f"model.max_seq_len={max(seq, 512)}", f"trainer.precision={precision}"]
    if dropout is not None:
        overrides.append(f"model.dropout={dropout}")
    cfg = compose(CONFIG_DIR, overrides)
    torch.set_num_threads(threads)
    device = torch.device(device)
    b = {k: v.to(device) for k, v in _batch(cfg.model, batch, seq).items()}
    contenders = {"seqpar": ours(cfg, cfg.trainer, device), "transformers": transformers_model(cfg, cfg.trainer, device)}
    runs = list(contenders.items())
    if torch_dropout:  # the same model and optimizer, its steps alternating between the two kinds of masks
        _, step = contenders["seqpar"]
        runs.append(("seqpar_torch_dropout", (None, lambda b, step=step: step(b, keyed_dropout=False))))
    times = {name: [] for name, _ in runs}
    for i in range(warmup + steps):
        for name, (_, step) in runs if i % 2 == 0 else runs[::-1]:  # alternate the order too
            start = time.perf_counter()
            step(b)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    from seqpar.trainer.metrics import flops_per_token

    flops = flops_per_token(contenders["seqpar"][0], cfg.model, seq) * batch * seq
    peak = matmul_gflops(threads, dtype=torch.bfloat16 if precision == "bf16" else torch.float32, device=device)
    result = {"model": model_name, "batch": batch, "seq": seq, "threads": threads, "steps": steps, "precision": precision,
              "matmul_gflops": peak, "dropout": cfg.model.dropout}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"step_s": med, "gflops": flops / med / 1e9, "of_matmul": flops / med / 1e9 / peak}
    result["speedup"] = result["transformers"]["step_s"] / result["seqpar"]["step_s"]
    if torch_dropout:
        result["keyed_dropout_cost"] = result["seqpar"]["step_s"] / result["seqpar_torch_dropout"]["step_s"]
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2_small", help="a configs/model name (gpt, bert or llama architecture)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dropout", type=float, default=None, help="hidden dropout of both models (default: config's)")
    ap.add_argument("--torch-dropout", action="store_true",
                    help="also time our model with torch's RNG dropout masks instead of the per-token keyed ones")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: both steps' forward and loss under bf16 autocast, the matmul rate in bf16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the matmul probe then runs on it, 8192 x 8192)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    r = run(args.model, args.batch, args.seq, args.steps, args.warmup, args.threads, args.dropout, args.torch_dropout,
            args.precision, args.device)
    print(f"{r['model']} batch {r['batch']} x seq {r['seq']}, {r['threads']} threads, dropout {r['dropout']}; "
          f"{r['precision']} matmul {r['matmul_gflops']:.0f} GFLOP/s")
    for name in ("seqpar", "transformers", "seqpar_torch_dropout"):
        if name in r:
            x = r[name]
            print(f"  {name:20s} {x['step_s']:.3f} s/step  {x['gflops']:.0f} GFLOP/s  ({x['of_matmul']:.0%} of matmul)")
    print(f"  speedup (transformers / seqpar step time): {r['speedup']:.2f}x")
    if "keyed_dropout_cost" in r:
        print(f"  keyed dropout / torch dropout step time: {r['keyed_dropout_cost']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
