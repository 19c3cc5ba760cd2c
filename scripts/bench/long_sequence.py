#!/usr/bin/env python
"""The longest-sequence settings against their absence: peak memory per rank of one training step of a long sequence
at sp=2, measured (`peak_mem_mib` of `train.py`) beside the planner's estimate, for a GPT of gpt2_small's width and
the ~125M Llama (two layers each, to keep a CPU step short; every setting acts per layer or at the loss, so the
layers' count scales the activations, not the comparison), and the longest sequence the planner fits in a per-rank
budget at sp=4 with and without them.

    python scripts/bench/long_sequence.py                       # 4K tokens; a markdown table
    python scripts/bench/long_sequence.py --tokens 16384 --json out.json

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
       "checkpoint.at_end=false", "logger.wandb.mode=disabled"]
MEASURE_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}  # the live memory, as planner_accuracy


def sized(tokens: int) -> list[str]:
    return [f"data.seq_len={tokens}", f"model.max_seq_len={tokens}"]


def measure(overrides: list[str], workdir: Path) -> float:
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, *RUN, f"hydra.run.dir={workdir}"]
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--budget-gib", type=float, default=80.0, help="per-rank budget for the longest sequence")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
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
