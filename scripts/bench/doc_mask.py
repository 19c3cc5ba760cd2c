#!/usr/bin/env python
"""Ring attention with document masking against ring attention without it, on windows of documents whose lengths
follow the built-in corpus.

Document lengths: the built-in corpus's documents (`seqpar.data.corpus.builtin_documents`, the standard library's
docstrings and pydoc topics) in a seeded random order, each `len(text) / --chars-per-token` tokens (at least 1),
packed one after another into windows of --seq-len tokens (the last document cut at the window's end), as the
packed stream gives them. Shape: batch 1, --heads heads of --head-dim (12 x 64: GPT-2 small's), fp32, causal (the
zigzag ring), one thread per rank. Each row is the fastest of --reps forward + backward steps after a warm-up at a
short length (time: the slowest rank).

Attention work is counted as the ring's kernels compute it: (query, key) pairs of every kernel call, a causal
(diagonal) call counting half its rectangle, times 4 x H x D FLOPs forward and 2.5 times that backward
(`pairs` below). Without masking a rank computes its whole blocks (`_block_slices`); with masking the pieces of
`ring.document_pieces` (chunk pairs sharing a document, trimmed to the documents they share). The step's time is
the slowest rank's, so the proportionality check compares the time ratio with the ratio of the largest per-rank
work (`max_rank`); `needed` is the work no kernel can avoid: each document's own causal triangle.

    python scripts/bench/doc_mask.py --seq-len 16384 --sp 2 4 --json docs/img/doc_mask.json
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import torch.distributed as dist
from memlib import fastest_step, run_ranks

FLOPS_PER_PAIR = 4 * 3.5  # per head dim: QK^T and PV forward (2 x 2), backward 2.5 times forward


def document_lengths(seq_len: int, windows: int, chars_per_token: float, seed: int) -> list[list[int]]:
    """Token counts of the documents of each window, from the built-in corpus in a seeded order."""
    from seqpar.data.corpus import builtin_documents

    docs = [max(1, round(len(d) / chars_per_token)) for d in builtin_documents()]
    random.Random(seed).shuffle(docs)
    out, i = [], 0
    for _ in range(windows):
        lengths, room = [], seq_len
        while room:
            lengths.append(min(room, docs[i % len(docs)]))
            room -= lengths[-1]
            i += 1
        out.append(lengths)
    return out


def _ids(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]  # (1, T)


def pairs(lengths: list[int], sp: int) -> dict:
    """(query, key) pairs the ring's kernels compute per rank, with and without documents, and the needed ones."""
    from seqpar.parallel.sequence import shard_sequence
    from seqpar.parallel.sequence.ring_blocks import block_slices, document_pieces

    ids = _ids(lengths)
    t = ids.shape[1] // sp
    chunks = [shard_sequence(ids, sp, r, True) for r in range(sp)]

    def size(qs, ks, causal):
        n = (qs.stop - qs.start) * (ks.stop - ks.start)
        return n / 2 if causal else n

    full = [sum(size(*block_slices(r, s, True, t)) for s in range(sp)) for r in range(sp)]
    masked = [sum(size(*p) for s in range(sp) for p in document_pieces(r, s, True, chunks)) for r in range(sp)]
    return {"full_max_rank": max(full), "full_total": sum(full), "masked_max_rank": max(masked),
            "masked_total": sum(masked), "needed": sum(n * (n + 1) / 2 for n in lengths),
            "kernel_calls": sum(len(document_pieces(r, s, True, chunks)) for r in range(sp) for s in range(sp))}


def _step(lengths, masked: bool, heads: int, head_dim: int):
    from seqpar.parallel.sequence import sequence_attention, shard_sequence

    sp, rank = dist.get_world_size(), dist.get_rank()
    ids = shard_sequence(_ids(lengths), sp, rank, True) if masked else None
    g = torch.Generator().manual_seed(rank)
    t = sum(lengths) // sp
    leaves = [torch.randn(1, t, heads, head_dim, generator=g).requires_grad_() for _ in range(3)]  # model layout
    attn = sequence_attention("ring", dist.group.WORLD)

    def step():
        q, k, v = (x.transpose(1, 2) for x in leaves)
        attn(q, k, v, causal=True, key_padding_mask=None, dropout_p=0.0, document_ids=ids).sum().backward()

    return step


def _rank(lengths, heads: int, head_dim: int, reps: int, out_path: str) -> None:
    torch.set_num_threads(1)
    sp = dist.get_world_size()
    _step([64] * (8 * sp), True, heads, head_dim)()  # warm-up at a short length: kernels, autograd, buffers
    row = {}
    for masked in (False, True):
        row["masked_s" if masked else "full_s"] = fastest_step(_step(lengths, masked, heads, head_dim), reps)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(row, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--sp", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--windows", type=int, default=2, help="windows measured (each its own documents)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chars-per-token", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = []
    for w, lengths in enumerate(document_lengths(args.seq_len, args.windows, args.chars_per_token, args.seed)):
        for sp in args.sp:
            work = pairs(lengths, sp)
            r = run_ranks(_rank, sp, lengths, args.heads, args.head_dim, args.reps, timeout=1200)
            flops = FLOPS_PER_PAIR * args.heads * args.head_dim
            row = {"window": w, "sp": sp, "seq_len": args.seq_len, "documents": len(lengths),
                   "median_doc": sorted(lengths)[len(lengths) // 2], "longest_doc": max(lengths), **r,
                   "time_ratio": r["masked_s"] / r["full_s"],
                   "work_ratio_max_rank": work["masked_max_rank"] / work["full_max_rank"],
                   "work_ratio_total": work["masked_total"] / work["full_total"],
                   "needed_ratio": work["needed"] / work["full_total"],
                   "full_gflop": flops * work["full_total"] / 1e9, "masked_gflop": flops * work["masked_total"] / 1e9,
                   "kernel_calls": work["kernel_calls"]}
            row["time_over_work"] = row["time_ratio"] / row["work_ratio_max_rank"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
