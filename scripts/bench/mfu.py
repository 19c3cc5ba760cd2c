#!/usr/bin/env python
"""Model FLOPs utilisation (MFU) of training, as `train.py` runs it, at one or more sequence lengths.

Each length is one `train.py` run of `--steps` steps (logged every step, no evaluation or checkpoint until the end,
wandb off); the report is the median over the steps after `--warmup` of the trainer's own `tokens_per_s` and
`mfu`: tokens per second x model FLOPs per token (6 per weight plus attention's 12 x layers x hidden x length,
`seqpar.trainer.metrics.flops_per_token`) / (the device's peak x the number of ranks).

The peak: on CUDA the device's dense peak for the run's precision (bf16, or fp32; known GPUs,
`seqpar.trainer.metrics.PEAK_FLOPS`) unless `--peak-tflops` is given; on CPU the fp32 matmul rate of this machine with the training's thread count, the best
of probes before and after every run (a shared machine's rate moves; the MFU is rescaled to that best), so a CPU
MFU is a fraction of what the machine's matmul reaches, not of a datasheet number.

    python scripts/bench/mfu.py --model gpt2_small --seq 1024 8192 --device cuda --precision bf16 --batch 8
    python scripts/bench/mfu.py --model gpt_tiny --seq 128 256 --device cpu --steps 6 --json out.json

Extra `train.py` overrides follow `--`, e.g. `-- trainer.activation_checkpointing=true parallel.sp=2`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import matmul_gflops  # noqa: E402 - the sibling benchmark's matmul probe


def train_overrides(args, seq: int, run_dir: Path, peak_flops: float | None) -> list[str]:
    out = [f"model={args.model}", f"data.seq_len={seq}", f"model.max_seq_len={seq}",
           f"trainer.global_batch_size={args.batch}", f"trainer.max_steps={args.steps}", "trainer.log_every=1",
           "trainer.eval_every=0", "trainer.eval_batches=1", f"trainer.warmup_steps={args.steps}",
           f"trainer.precision={args.precision}", f"device={args.device}", f"trainer.threads={args.threads}",
           "checkpoint.at_end=false", "trainer.save_final=false", f"hydra.run.dir={run_dir}"]
    if peak_flops:
        out.append(f"trainer.peak_flops={peak_flops}")
    return out + args.overrides


def measure(args, seq: int, peak_flops: float | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / f"seq{seq}"
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *train_overrides(args, seq, run_dir, peak_flops)],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"train.py failed at seq {seq}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "tokens_per_s" in r and r["step"] > args.warmup]
    if not steps:
        raise SystemExit(f"no step after --warmup {args.warmup} was logged; raise --steps")
    row = {"model": args.model, "seq": seq, "batch": args.batch, "device": args.device, "precision": args.precision,
           "steps": len(steps), "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
           "peak_mem_mib": max(r["peak_mem_mib"] for r in steps)}
    if all("mfu" in r for r in steps):
        row["mfu"] = statistics.median(r["mfu"] for r in steps)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2_small", help="a configs/model name")
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 8192], help="sequence lengths, one run each")
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per rank")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak (default: known GPU or measured CPU matmul)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("overrides", nargs="*", help="more train.py overrides (after --)")
    args = ap.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.warmup >= args.steps:
        ap.error(f"--warmup ({args.warmup}) must be less than --steps ({args.steps})")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    probe = peak is None and args.device == "cpu"
    if probe:
        peak = matmul_gflops(args.threads) * 1e9
    rows = []
    for seq in args.seq:
        rows.append(measure(args, seq, peak))
        rows[-1]["peak_flops"] = peak  # the peak the trainer divided by
        if probe:
            peak = max(peak, matmul_gflops(args.threads) * 1e9)
    for r in rows:  # every MFU against the best rate seen
        if "mfu" in r:
            r["mfu"] *= r["peak_flops"] / peak
        r["peak_flops"] = peak
    print("| model | seq | batch | device | precision | tokens/s | MFU | peak memory (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a (unknown device peak: pass --peak-tflops)"
        print(f"| {r['model']} | {r['seq']} | {r['batch']} | {r['device']} | {r['precision']} | "
              f"{r['tokens_per_s']:.0f} | {mfu} | {r['peak_mem_mib']:.0f} |")
    if peak:
        print(f"peak: {peak / 1e12:.3f} TFLOP/s per device" + (" (measured fp32 matmul)" if args.device == "cpu" and
                                                                   not args.peak_tflops else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
