#!/usr/bin/env python
"""The memory planner's estimate against the measured peak of real CPU runs, for several layouts and both models.

Each layout runs `train.py -m model=gpt_tiny,bert_tiny` at a size where activations and logits outweigh the
runtime (hidden 256, FFN 1024, 8 sequences x 512 tokens, one step, one thread per rank), and its `peak_mem_mib`
(maximum over ranks) is set beside `python -m seqpar.plan`'s estimate for the same overrides (`--device cpu`).

    python scripts/bench/planner_accuracy.py                     # every layout below; a markdown table
    python scripts/bench/planner_accuracy.py --layouts "sp=2 ring" "tp=2" --json out.json
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
SIZE = ["model.hidden_size=256", "model.ffn_hidden_size=1024", "model.max_seq_len=512", "data.seq_len=512",
        "trainer.global_batch_size=8"]
RUN = ["trainer.max_steps=1", "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.threads=1",
       "trainer.save_final=false", "checkpoint.at_end=false", "logger.wandb.mode=disabled"]
# One thread per rank; glibc serves every allocation above 128 KiB by mmap, so a freed tensor leaves the resident
# set at once and the peak is the live memory (what a GPU's allocator reports), not what malloc kept after frees
# (with glibc's adaptive threshold the same run peaks 10-30% higher, by a different amount on every rank).
MEASURE_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
LAYOUTS = {
    "sp=1 (one process)": [],
    "sp=2 ring": ["parallel.sp=2"],
    "sp=4 ring": ["parallel.sp=4"],
    "sp=2 rsa": ["parallel.sp=2", "parallel.sp_impl=rsa"],
    "sp=2 ulysses": ["parallel.sp=2", "parallel.sp_impl=ulysses"],
    "dp=2": ["parallel.dp=2"],
    "tp=2": ["parallel.tp=2"],
    "tp=2 x sp=2": ["parallel.tp=2", "parallel.sp=2"],
    "pp=2 (1f1b, 4 micro-batches)": ["parallel.pp=2", "parallel.microbatches=4"],
    # dp x sp > 1 with pp: each stage's gradient reducer holds only its own layers
    "dp=2 x pp=2 (1f1b, 2 micro-batches)": ["parallel.dp=2", "parallel.pp=2", "parallel.microbatches=2"],
    "activation checkpointing": ["trainer.activation_checkpointing=true"],
    # each MLP 128 tokens at a time, forward and in its recompute
    "activation checkpointing + tiled MLP": ["trainer.activation_checkpointing=true", "trainer.tiled_mlp=128"],
    # all-to-all over pairs of ranks, a ring of 2 across them
    "sp=4 hybrid (ulysses=2)": ["parallel.sp=4", "parallel.sp_impl=hybrid", "parallel.ulysses=2"],
    # DeepSpeed: its runtime baseline (the probe's, with DeepSpeed started), the reduce bucket our config sizes to
    # the model, the fp32 partition; ZeRO-2 partitions the gradients, ZeRO-3 the weights too
    "ZeRO-1 dp=2": ["parallel.dp=2", "trainer.engine=deepspeed", "trainer.zero_stage=1"],
    "ZeRO-2 dp=2": ["parallel.dp=2", "trainer.engine=deepspeed", "trainer.zero_stage=2"],
    "ZeRO-3 dp=2": ["parallel.dp=2", "trainer.engine=deepspeed", "trainer.zero_stage=3"],
    # ZeRO-3 with block inputs "offloaded" (on a CPU, to the same memory)
    "ZeRO-3 dp=2, offloaded checkpointing": ["parallel.dp=2", "trainer.engine=deepspeed", "trainer.zero_stage=3",
                                             "trainer.activation_checkpointing=offload"],
}


def prepare() -> None:
    """Train the tokenizers and cache the token ids first: a job that builds them holds the memory of doing so (and
    a rank's parent that builds them passes it on to every forked rank), which is no part of training."""
    from seqpar.cli import compose
    from seqpar.configs import CONFIG_DIR
    from seqpar.data.sequences import build_sequences

    for model in ("gpt_tiny", "bert_tiny"):
        build_sequences(compose(CONFIG_DIR, [f"model={model}", *SIZE]))


def measure(layout: list[str], workdir: Path) -> dict[str, float]:
    """{model: measured peak MiB} of one multirun over both models."""
    sweep = workdir / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "model=gpt_tiny,bert_tiny", *SIZE, *layout, *RUN,
           f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env={**os.environ, **MEASURE_ENV})
    out = {}
    for model, job in zip(("gpt_tiny", "bert_tiny"), ("0", "1"), strict=True):
        out[model] = json.loads((sweep / job / "metrics.jsonl").read_text().splitlines()[0])["peak_mem_mib"]
    return out


def estimate(model: str, layout: list[str]) -> float:
    from seqpar.cli import compose
    from seqpar.configs import CONFIG_DIR
    from seqpar.plan.estimate import plan

    cfg = compose(CONFIG_DIR, [f"model={model}", *SIZE, *layout])
    p = cfg.parallel
    per_rank = cfg.trainer.global_batch_size // p.dp
    micro = per_rank // p.microbatches if p.pp > 1 else (cfg.trainer.micro_batch_size or per_rank)
    for row in plan(cfg, gpus=p.dp * p.pp * p.tp * p.sp, gpu_mem_gib=100, device="cpu"):
        if (row.dp, row.pp, row.tp, row.sp, row.micro_batch_size) == (p.dp, p.pp, p.tp, p.sp, micro):
            return row.peak_mib
    raise RuntimeError(f"the planner has no row for {layout}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    prepare()
    rows = []
    print("| layout | GPT measured | GPT estimate | BERT measured | BERT estimate | estimate error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.layouts:
        with tempfile.TemporaryDirectory() as tmp:
            measured = measure(LAYOUTS[name], Path(tmp))
        est = {m: estimate(m, LAYOUTS[name]) for m in measured}
        err = [(est[m] - measured[m]) / measured[m] for m in measured]
        rows.append({"layout": name, "measured_mib": measured, "estimate_mib": est})
        print(f"| {name} | {measured['gpt_tiny']:.0f} | {est['gpt_tiny']:.0f} | {measured['bert_tiny']:.0f} | "
              f"{est['bert_tiny']:.0f} | {err[0]:+.0%}, {err[1]:+.0%} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
