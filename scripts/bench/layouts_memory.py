#!/usr/bin/env python
"""Tensor against sequence parallelism at a fixed world size: the longest sequence and the largest batch that fit.

The paper's comparison (Li et al., Fig. 5/6: 3.0x the sequence length and 13.7x the batch of tensor parallelism
at 64 GPUs), on local gloo ranks: at a world size of 4, for tp=4, sp=4 (ring), sp=4 (rsa) and tp=2 x sp=2 (ring),
one forward + backward of a BERT-base-width model (hidden 768, 12 heads, FFN 3072; 2 layers and a 4096-token
vocabulary to keep CPU runs short; the per-layer memory is what differs between layouts) with its MLM loss:
- sequence sweep: batch 1, the length doubles from --start-len until a rank needs more than --budget-mib;
- batch sweep: length --batch-len, the batch doubles from 1 until a rank needs more than the budget.
Memory is measured as in `memlib.py` (peak resident set of the step, maximum over ranks).

    pip install -e ".[bench]"
    python scripts/bench/layouts_memory.py --out docs/img/layouts_memory.png --json docs/img/layouts_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from memlib import fixed_mmap_threshold, measure_step, run_ranks

LAYOUTS = {"tp=4": (4, 1, "ring"), "sp=4 ring": (1, 4, "ring"), "sp=4 rsa": (1, 4, "rsa"), "tp=2 x sp=2": (2, 2, "ring")}


def _model_step(layout: str, batch: int, seq_len: int):
    from seqpar.config import ModelConfig, ParallelConfig
    from seqpar.models import build_model, set_core_attention
    from seqpar.parallel.mesh import ParallelMesh
    from seqpar.parallel.sequence import sequence_attention, shard_sequence
    from seqpar.parallel.tensor import apply_tensor_parallel, loss_context

    tp, sp, impl = LAYOUTS[layout]
    mesh = ParallelMesh.from_config(ParallelConfig(tp=tp, sp=sp, sp_impl=impl), torch.device("cpu"))
    cfg = ModelConfig(arch="bert", num_layers=2, hidden_size=768, num_heads=12, vocab_size=4096, max_seq_len=seq_len)
    torch.manual_seed(0)
    model = build_model(cfg)
    if sp > 1:
        set_core_attention(model, sequence_attention(impl, mesh.group("sp")))
    if tp > 1:
        apply_tensor_parallel(model, mesh.device_mesh["tp"])
    ids = torch.randint(5, 4096, (batch, seq_len))
    pos = torch.arange(seq_len).expand(batch, seq_len)
    labels = torch.where(torch.rand(batch, seq_len) < 0.15, ids, -100)
    r = mesh.local_rank("sp")
    ids, pos, labels = (shard_sequence(t, sp, r, zigzag=False) for t in (ids, pos, labels))

    def step():
        with loss_context(tp):
            logits = model(ids, pos)
            F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").backward()

    return step


def _rank(layout: str, batch: int, seq_len: int, out_path: str) -> None:
    fixed_mmap_threshold()
    _model_step(layout, 1, 256)()  # warm-up: kernels, autograd, communication
    measure_step(_model_step(layout, batch, seq_len), out_path)


def sweep(layout: str, kind: str, start: int, fixed: int, limit: int, budget: float, timeout: float) -> list[dict]:
    rows, n = [], start
    while n <= limit:
        batch, seq_len = (1, n) if kind == "seq" else (n, fixed)
        r = run_ranks(_rank, 4, layout, batch, seq_len, timeout=timeout)
        rows.append({"layout": layout, "sweep": kind, "batch": batch, "seq_len": seq_len, **r})
        print(json.dumps(rows[-1]), flush=True)
        if r["peak_mib"] > budget:
            break
        n *= 2
    return rows


def longest(rows: list[dict], layout: str, kind: str, budget: float) -> int:
    key = "seq_len" if kind == "seq" else "batch"
    fits = [r[key] for r in rows if r["layout"] == layout and r["sweep"] == kind and r["peak_mib"] <= budget]
    return max(fits) if fits else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--start-len", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=65536)
    ap.add_argument("--batch-len", type=int, default=512, help="sequence length of the batch sweep")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--budget-mib", type=float, default=1024.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default="docs/img/layouts_memory.png")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rows = []
    for layout in args.layouts:
        rows += sweep(layout, "seq", args.start_len, 0, args.max_len, args.budget_mib, args.timeout)
        rows += sweep(layout, "batch", 1, args.batch_len, args.max_batch, args.budget_mib, args.timeout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    tp = {k: longest(rows, "tp=4", k, args.budget_mib) for k in ("seq", "batch")}
    print(f"| layout | longest sequence (batch 1) | vs tp=4 | largest batch ({args.batch_len} tokens) | vs tp=4 |")
    print("| --- | --- | --- | --- | --- |")
    for layout in args.layouts:
        s, b = longest(rows, layout, "seq", args.budget_mib), longest(rows, layout, "batch", args.budget_mib)
        rs = f"{s / tp['seq']:.1f}x" if tp.get("seq") else "-"
        rb = f"{b / tp['batch']:.1f}x" if tp.get("batch") else "-"
        print(f"| {layout} | {s} | {rs} | {b} | {rb} |")
    plot(rows, args.out, args.budget_mib)
    print(f"plot: {args.out}", file=sys.stderr)


def plot(rows: list[dict], path: str, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, kind, key, label in ((axes[0], "seq", "seq_len", "sequence length (batch 1)"),
                                 (axes[1], "batch", "batch", "batch size (sequence fixed)")):
        for layout in LAYOUTS:
            pts = sorted((r[key], r["peak_mib"]) for r in rows if r["layout"] == layout and r["sweep"] == kind)
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, "o-", label=layout)
        ax.axhline(budget, color="gray", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="peak MiB per rank (fwd+bwd)")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("BERT-base width (2 layers), world size 4")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
