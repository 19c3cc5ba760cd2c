#!/usr/bin/env python
"""The longest-sequence settings against their absence: peak memory per rank of one training step of a long sequence
at sp=2, measured (`peak_mem_mib` of `train.py`) beside the planner's estimate, for a GPT of gpt2_small's width and
the ~125M Llama (two layers each, to keep a CPU step short; every setting acts per layer or at the loss, so the
layers' count scales the activations, not the comparison), and the longest sequence the planner fits in a per-rank
budget at sp=4 with and without them.

    python scripts/bench/long_sequence.py                       # 4K tokens; a markdown table
    python scripts/bench/long_sequence.py --tokens 16384 --json out.json
    python scripts/bench/long_sequence.py --measured-longest 2048 4096 8192 16384   # peaks at sp=4, measured
    python scripts/bench/long_sequence.py --mlp-recompute 16384  # one MLP's recompute peak, tiled against whole
    python scripts/bench/long_sequence.py --loss-peak 8192      # the output layer + loss's peak, fused against not

`--measured-longest` measures the GPT's peak per rank at sp=4 at each length with neither setting (the code before
them) and with both, and prints the longest length within each of `--budgets-mib`. `--mlp-recompute` measures, in
this process, the peak of one checkpointed MLP's backward (its recompute and its gradients) at each model's width,
tiled against whole: what tiling takes off the rebuilt block. `--loss-peak` measures, in this process, what the
output layer and the loss (forward and backward) of that many tokens of one rank add to the memory live before
them, with the fused loss against the logits and `loss_sum`.

Settings (each on top of activation checkpointing, which every long-sequence run uses): `trainer.fused_loss` (the
output layer and the loss a slab of tokens at a time) and `trainer.tiled_mlp` (each MLP a tile of hidden_size
tokens at a time). `trainer.activation_checkpointing=offload` moves block inputs to host memory, which on a CPU is
the same memory, so it is left to a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = {"GPT (gpt2_small width)": ["model=gpt2_small", "model.num_layers=2"],
          "Llama (llama_125m width)": ["model=llama_125m", "model.num_layers=2"]}
SETTINGS = {
    "neither": ["trainer.fused_loss=false", "trainer.tiled_mlp=false"],
    "fused loss": ["trainer.fused_loss=true", "trainer.tiled_mlp=false"],
    "fused loss + tiled MLP": ["trainer.fused_loss=true", "trainer.tiled_mlp=true"],
}
# Two steps: the first step's backward runs before AdamW has made its moments; the planner counts them.
RUN = ["parallel.sp=2", "trainer.activation_checkpointing=true", "trainer.global_batch_size=1", "trainer.max_steps=2",
       "trainer.eval_every=0", "trainer.log_every=1", "trainer.eval_batches=1", "trainer.threads=1", "trainer.save_final=false",
       "checkpoint.at_end=false", "logger.wandb.mode=disabled",
       "data.val_fraction=0.1"]  # a validation split of at least one sequence at 16K tokens of the built-in corpus
MEASURE_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}  # the live memory, as planner_accuracy


def sized(tokens: int) -> list[str]:
    return [f"data.seq_len={tokens}", f"model.max_seq_len={tokens}"]


def measure(overrides: list[str], workdir: Path, sp: int = 2) -> float:
    run = [o if not o.startswith("parallel.sp=") else f"parallel.sp={sp}" for o in RUN]
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, *run, f"hydra.run.dir={workdir}"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env={**os.environ, **MEASURE_ENV})
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return max(r["peak_mem_mib"] for r in records if "peak_mem_mib" in r)  # step 2: AdamW's moments exist


def estimate(overrides: list[str]) -> float:
    from seqpar.cli import compose
    from seqpar.configs import CONFIG_DIR
    from seqpar.plan.estimate import plan

    cfg = compose(CONFIG_DIR, [*overrides, *RUN])
    for row in plan(cfg, gpus=2, gpu_mem_gib=1000, device="cpu"):
        if (row.dp, row.pp, row.tp, row.sp) == (1, 1, 1, 2):
            return row.peak_mib
    raise RuntimeError("the planner has no sp=2 row")


def longest(overrides: list[str], budget_gib: float) -> int:
    """The longest power-of-two-multiple of 1024 tokens whose sp=4 row fits `budget_gib` per rank (bf16, CUDA)."""
    from seqpar.cli import compose
    from seqpar.configs import CONFIG_DIR
    from seqpar.plan.estimate import plan

    best, tokens = 0, 1024
    while tokens <= 2**24:
        cfg = compose(CONFIG_DIR, [*overrides, *sized(tokens), *RUN, "trainer.precision=bf16", "parallel.sp=4"])
        rows = [r for r in plan(cfg, gpus=4, gpu_mem_gib=budget_gib) if (r.dp, r.pp, r.tp, r.sp) == (1, 1, 1, 4)]
        if not rows or not rows[0].fits:
            break
        best, tokens = tokens, tokens * 2
    return best


def measured_longest(lengths: list[int], budgets_mib: list[float]) -> list[dict]:
    """The GPT's measured peak per rank at sp=4 at each length, with neither setting and with both (a setting's
    doubling stops at the first length above the largest budget), and the longest length within each budget."""
    rows = []
    model = "GPT (gpt2_small width)"
    for setting in ("neither", "fused loss + tiled MLP"):
        peaks = {}
        for tokens in lengths:
            overrides = [*MODELS[model], *SETTINGS[setting], *sized(tokens)]
            with tempfile.TemporaryDirectory() as tmp:
                peaks[tokens] = measure(overrides, Path(tmp) / "run", sp=4)
            print(f"| {model} | {setting} | {tokens:,} | {peaks[tokens]:.0f} |", flush=True)
            if peaks[tokens] > max(budgets_mib):
                break
        longest_within = {str(b): max([t for t, p in peaks.items() if p <= b], default=0) for b in budgets_mib}
        rows.append({"model": model, "setting": setting, "peak_mib": {str(t): p for t, p in peaks.items()},
                     "longest_within_mib": longest_within})
    for b in budgets_mib:
        before, after = (r["longest_within_mib"][str(b)] for r in rows)
        print(f"budget {b:.0f} MiB per rank: {before:,} tokens with neither, {after:,} with both "
              f"({after / before if before else float('inf'):.1f}x)")
    return rows


def mlp_recompute_peak(model: str, tokens: int, tiled: bool) -> float:
    """MiB the backward of one checkpointed MLP (at `model`'s width, `tokens` tokens) adds to what was live before
    it, tiled (hidden_size tokens per tile, the trainer's automatic choice) or whole; fp32, this process."""
    import gc

    import torch
    from memlib import _rss_kib, fixed_mmap_threshold
    from torch.utils.checkpoint import checkpoint

    from seqpar.cli import compose
    from seqpar.configs import CONFIG_DIR
    from seqpar.models.layers import MLP, GatedMLP, set_mlp_tiling

    fixed_mmap_threshold()
    torch.set_num_threads(1)
    cfg = compose(CONFIG_DIR, [MODELS[model][0]]).model
    mlp = (GatedMLP if cfg.arch == "llama" else MLP)(cfg)
    set_mlp_tiling(mlp, cfg.hidden_size if tiled else None)
    x = torch.randn(1, tokens, cfg.hidden_size, requires_grad=True)
    out = checkpoint(mlp, x, use_reentrant=False)
    grad = torch.ones_like(out)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again from what is live now
    base = _rss_kib("VmRSS")
    out.backward(grad)
    return (_rss_kib("VmHWM") - base) / 1024


def loss_peak(tokens: int, fused: bool) -> tuple[float, float]:
    """(MiB the output layer and the loss of `tokens` tokens add to what was live before them, forward through
    backward; MiB of that which is the output weight's gradient, which every path makes) at gpt2_small's width
    and vocabulary, fp32, this process."""
    import gc

    import torch
    import torch.nn.functional as F
    from memlib import _rss_kib, fixed_mmap_threshold

    from seqpar.trainer.loss import linear_loss_sum, loss_sum

    fixed_mmap_threshold()
    torch.set_num_threads(1)
    hidden, vocab = 768, 50257
    weight = torch.nn.Parameter(torch.randn(vocab, hidden) * 0.02)
    features = torch.randn(1, tokens, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS")
    loss = linear_loss_sum(features, weight, None, labels) if fused else loss_sum(F.linear(features, weight), labels)
    loss.backward()
    return (_rss_kib("VmHWM") - base) / 1024, weight.grad.numel() * 4 / 2**20


def mlp_recompute(tokens: int) -> list[dict]:
    rows = []
    for model in MODELS:
        peaks = {tiled: mlp_recompute_peak(model, tokens, tiled) for tiled in (False, True)}
        rows.append({"model": model, "tokens": tokens, "whole_mib": peaks[False], "tiled_mib": peaks[True]})
        print(f"| {model} | {tokens:,} | {peaks[False]:.0f} | {peaks[True]:.0f} | {peaks[False] / peaks[True]:.1f}x |",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--budget-gib", type=float, default=80.0, help="per-rank budget for the longest sequence")
    ap.add_argument("--measured-longest", type=int, nargs="+", metavar="TOKENS",
                    help="measure the GPT's peak at sp=4 at these lengths instead")
    ap.add_argument("--budgets-mib", type=float, nargs="+", default=[1536.0, 2048.0],
                    help="per-rank budgets for --measured-longest")
    ap.add_argument("--mlp-recompute", type=int, metavar="TOKENS", help="measure one MLP's recompute peak instead")
    ap.add_argument("--loss-peak", type=int, metavar="TOKENS", help="measure the output layer + loss's peak instead")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.measured_longest or args.mlp_recompute or args.loss_peak:
        out = {}
        if args.loss_peak:
            print("| loss | tokens | peak MiB | of which the weight's gradient |\n| --- | --- | --- | --- |")
            out["loss_peak"] = []
            for fused in (False, True):
                peak, weight_grad = loss_peak(args.loss_peak, fused)
                name = "fused" if fused else "logits + loss_sum"
                out["loss_peak"].append({"loss": name, "tokens": args.loss_peak, "peak_mib": peak,
                                         "weight_grad_mib": weight_grad})
                print(f"| {name} | {args.loss_peak:,} | {peak:.0f} | {weight_grad:.0f} |", flush=True)
        if args.mlp_recompute:
            print("| model | tokens | whole MiB | tiled MiB | ratio |\n| --- | --- | --- | --- | --- |")
            out["mlp_recompute"] = mlp_recompute(args.mlp_recompute)
        if args.measured_longest:
            print("| model | setting | tokens | peak MiB |\n| --- | --- | --- | --- |")
            out["measured_longest"] = measured_longest(args.measured_longest, args.budgets_mib)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        return
    rows = []
    print("| model | setting | measured MiB | estimate MiB | longest at sp=4 in the budget |")
    print("| --- | --- | --- | --- | --- |")
    for model, model_overrides in MODELS.items():
        for setting, setting_overrides in SETTINGS.items():
            overrides = [*model_overrides, *setting_overrides]
            with tempfile.TemporaryDirectory() as tmp:
                peak = measure([*overrides, *sized(args.tokens)], Path(tmp) / "run")
            est = estimate([*overrides, *sized(args.tokens)])
            full = [o for o in overrides if not o.startswith("model.num_layers")]  # the whole model's depth
            tokens = longest(full, args.budget_gib)
            rows.append({"model": model, "setting": setting, "measured_mib": peak, "estimate_mib": est,
                         "longest_tokens": tokens})
            print(f"| {model} | {setting} | {peak:.0f} | {est:.0f} | {tokens:,} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
