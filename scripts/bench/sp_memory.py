#!/usr/bin/env python
"""Peak memory per rank against sequence length for the sequence-parallel attentions (rsa, ring, ulysses, and
Linformer attention under sequence parallelism: `linformer`, projection length --linformer-k).

Two workloads, forward + backward, fp32, batch 1, on `sp` local gloo processes (sp = 1 runs the same code on a
one-process group):
- `layer`: one BERT-base-width self-attention layer (hidden 768, 12 heads): q/k/v/o projections + core attention;
- `model`: the whole bert_tiny model (4 layers, hidden 128, 4 heads) with its MLM loss.

Memory is measured as in `memlib.py`: each rank's peak resident set during the step above the one just before it,
maximum over ranks. For each (workload, impl, sp) the
length doubles until a rank needs more than --budget-mib, so the table also shows the longest length that fits.

    pip install matplotlib
    python scripts/bench/sp_memory.py --out docs/img/sp_memory.png --json docs/img/sp_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from memlib import fixed_mmap_threshold, measure_step, run_ranks

IMPLS = ("rsa", "ring", "ulysses", "linformer")
LINFORMER_K = 256


def _layer_step(impl: str, seq_len: int, group, sp: int, rank: int):
    from seqpar.config import ModelConfig
    from seqpar.models.layers import SelfAttention
    from seqpar.parallel.sequence import sequence_attention

    linformer = impl == "linformer"
    cfg = ModelConfig(arch="bert", hidden_size=768, num_heads=12, num_layers=1, max_seq_len=seq_len,
                      attention="linformer" if linformer else "softmax", linformer_k=LINFORMER_K)
    torch.manual_seed(0)
    layer = SelfAttention(cfg)
    if linformer:
        from seqpar.parallel.sequence.linformer import SequenceParallelProjection

        layer.sequence_projection = SequenceParallelProjection(group)
    else:
        layer.core_attention = sequence_attention(impl, group)
    x = torch.randn(1, seq_len // sp, 768, requires_grad=True)

    def step():
        layer(x).sum().backward()

    return step


def _model_step(impl: str, seq_len: int, group, sp: int, rank: int):
    from seqpar.config import ModelConfig
    from seqpar.models import build_model, set_core_attention, set_sequence_projection
    from seqpar.parallel.sequence import sequence_attention, shard_sequence
    from seqpar.parallel.sequence.linformer import SequenceParallelProjection

    linformer = impl == "linformer"
    cfg = ModelConfig(arch="bert", num_layers=4, hidden_size=128, num_heads=4, vocab_size=4096, max_seq_len=seq_len,
                      attention="linformer" if linformer else "softmax", linformer_k=LINFORMER_K)
    torch.manual_seed(0)
    model = build_model(cfg)
    if linformer:
        set_sequence_projection(model, SequenceParallelProjection(group))
    else:
        set_core_attention(model, sequence_attention(impl, group))
    ids = torch.randint(5, 4096, (1, seq_len))
    pos = torch.arange(seq_len)[None]
    labels = torch.where(torch.rand(1, seq_len) < 0.15, ids, -100)
    ids, pos, labels = (shard_sequence(t, sp, rank, zigzag=False) for t in (ids, pos, labels))

    def step():
        logits = model(ids, pos)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()

    return step


def _rank(workload: str, impl: str, seq_len: int, out_path: str) -> None:
    fixed_mmap_threshold()
    group, sp, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    make = _layer_step if workload == "layer" else _model_step
    make(impl, 256 * sp, group, sp, rank)()  # warm-up at a short length: kernels, autograd, communication
    measure_step(make(impl, seq_len, group, sp, rank), out_path)


def measure(workload: str, impl: str, sp: int, seq_len: int, timeout: float) -> dict:
    return run_ranks(_rank, sp, workload, impl, seq_len, timeout=timeout)


def plot(rows: list[dict], path: str, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.8), squeeze=False)
    styles = {"rsa": "s--", "ring": "o-", "ulysses": "^:", "linformer": "d-."}
    for ax, workload in zip(axes[0], workloads, strict=True):
        for impl in IMPLS:
            for sp in sorted({r["sp"] for r in rows}):
                pts = [(r["seq_len"], r["peak_mib"]) for r in rows
                       if (r["workload"], r["impl"], r["sp"]) == (workload, impl, sp)]
                if pts:
                    xs, ys = zip(*sorted(pts), strict=True)
                    ax.plot(xs, ys, styles[impl], label=f"{impl} sp={sp}", alpha=0.4 + 0.2 * sp.bit_length())
        ax.axhline(budget, color="gray", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="peak MiB per rank (fwd+bwd)",
               title={"layer": "BERT-base attention layer (768, 12 heads)", "model": "bert_tiny model + MLM loss"}[workload])
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    global LINFORMER_K
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["layer", "model"], choices=["layer", "model"])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--sp", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--start", type=int, default=1024, help="first sequence length")
    ap.add_argument("--max-len", type=int, default=32768, help="longest sequence length tried")
    ap.add_argument("--budget-mib", type=float, default=512.0, help="per-rank memory budget")
    ap.add_argument("--linformer-k", type=int, default=LINFORMER_K, help="Linformer's projection length")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per measurement")
    ap.add_argument("--out", default="docs/img/sp_memory.png")
    ap.add_argument("--json", default=None, help="also write the raw rows here")
    args = ap.parse_args()
    LINFORMER_K = args.linformer_k  # the ranks are forked: they see this value

    rows = []
    for workload in args.workloads:
        for impl in args.impls:
            for sp in args.sp:
                seq_len = args.start
                while seq_len <= args.max_len:
                    r = measure(workload, impl, sp, seq_len, args.timeout)
                    rows.append({"workload": workload, "impl": impl, "sp": sp, "seq_len": seq_len, **r})
                    print(json.dumps(rows[-1]), flush=True)
                    if r["peak_mib"] > args.budget_mib:
                        break
                    seq_len *= 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print_table(rows, args.budget_mib)
    plot(rows, args.out, args.budget_mib)
    print(f"plot: {args.out}", file=sys.stderr)


def print_table(rows: list[dict], budget: float) -> None:
    """Markdown: peak MiB per rank by length, and the longest length within the budget."""
    lengths = sorted({r["seq_len"] for r in rows})
    print("| workload | impl | sp | " + " | ".join(f"{n // 1024}K" for n in lengths) + f" | longest within {budget:.0f} MiB |")
    print("| --- " * (4 + len(lengths)) + "|")
    keys = sorted({(r["workload"], r["impl"], r["sp"]) for r in rows}, key=lambda k: (k[0], IMPLS.index(k[1]), k[2]))
    for key in keys:
        got = {r["seq_len"]: r["peak_mib"] for r in rows if (r["workload"], r["impl"], r["sp"]) == key}
        fits = [n for n, m in got.items() if m <= budget]
        best = f"{max(fits) // 1024}K" if fits else "none"
        if fits and max(fits) == max(got) and all(m <= budget for m in got.values()):
            best += " (longest tried)"
        cells = [f"{got[n]:.0f}" if n in got else "-" for n in lengths]
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {best} |")


if __name__ == "__main__":
    main()
