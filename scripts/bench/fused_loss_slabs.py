#!/usr/bin/env python
"""The fused output-layer loss (`seqpar.trainer.loss.linear_loss_sum`: forward, loss and the gradients of the
features and the weight) against the number of tokens in each slab, in fp32 and under bf16 autocast.

Each slab adds its share of the weight's gradient to one fp32 buffer of vocabulary x hidden elements (read and
written, and under bf16 converted from the slab's bf16 product), while its matmuls do 6 x rows multiply-adds per
element of that buffer: with few rows per slab the additions, bound by memory bandwidth, outweigh the matmuls. The
rows column sets the slab size directly; the trainer's rule is `linear_slab_rows` (LINEAR_SLAB_ELEMENTS, at least
LINEAR_SLAB_MIN_ROWS). Each row is the mean of two calls after one warm-up call, on one process; GFLOP/s counts the
head's 6 x tokens x vocabulary x hidden.

    python scripts/bench/fused_loss_slabs.py --tokens 1024 --rows 83 256 768 1536
    python scripts/bench/fused_loss_slabs.py --vocab 32000 --hidden 2048 --tokens 4096 --rows 128 256 512
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from seqpar.trainer import loss as loss_module


def time_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int, bf16: bool,
              reps: int = 2) -> float:
    """Seconds per call of the fused loss with slabs of `rows` tokens (mean of `reps` after a warm-up)."""
    saved = loss_module.LINEAR_SLAB_ELEMENTS["cpu"], loss_module.LINEAR_SLAB_MIN_ROWS
    loss_module.LINEAR_SLAB_ELEMENTS["cpu"], loss_module.LINEAR_SLAB_MIN_ROWS = rows * weight.shape[0], 1
    try:
        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                total = loss_module.linear_loss_sum(x, weight, None, labels)
            total.backward()
            x.grad = weight.grad = None

        call()
        start = time.perf_counter()
        for _ in range(reps):
            call()
        return (time.perf_counter() - start) / reps
    finally:
        loss_module.LINEAR_SLAB_ELEMENTS["cpu"], loss_module.LINEAR_SLAB_MIN_ROWS = saved


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rows", type=int, nargs="+", default=[83, 256, 768])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    weight = torch.nn.Parameter(torch.randn(args.vocab, args.hidden, generator=g) * 0.02)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    flops = 6 * args.tokens * args.vocab * args.hidden
    results = []
    print(f"vocab {args.vocab} x hidden {args.hidden}, {args.tokens} tokens, {args.threads} threads")
    print("| precision | rows per slab | s per call | GFLOP/s |")
    print("| --- | --- | --- | --- |")
    for precision in ("fp32", "bf16"):
        for rows in args.rows:
            seconds = time_loss(x, weight, labels, rows, precision == "bf16")
            results.append({"precision": precision, "rows": rows, "seconds": seconds, "gflops": flops / seconds / 1e9})
            print(f"| {precision} | {rows} | {seconds:.3f} | {flops / seconds / 1e9:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({**vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
