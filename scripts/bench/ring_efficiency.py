#!/usr/bin/env python
"""Ring attention's efficiency: sequence-parallel core attention (forward + backward) over sp local processes of one
thread each, against one process with --threads (2) threads running SDPA over the whole length, with our rsa and
ulysses and two peers beside it, in one run: DeepSpeed-Ulysses' `DistributedAttention` (SDPA on each rank's heads)
and the paper's own Ring Self-Attention (ColossalAI's legacy `RingQK` / `RingAV`), each measured where installed
and skipped with a message (and its install line) where not; see peers.py.

Shape: batch 1, 12 heads of 64 (BERT-base width), fp32, bidirectional (--causal for GPT's zigzag ring). Each row
is the fastest of --reps steps after a warm-up step at a short length (time: the slowest rank); peak memory per
rank is the first step's resident high-water mark above the resident set before it (see memlib.py), maximum over
ranks.

Overlap (ring only): the share of the ring's communication hidden behind its compute,
(compute + communication - ring) / communication, where `compute` runs the same per-block kernels and merges
with no exchange and `communication` runs the same exchanges with no compute, both timed on the same ranks.

    python scripts/bench/ring_efficiency.py --lengths 4096 8192 16384 --sp 2 4 --json docs/img/ring_efficiency.json
    python scripts/bench/ring_efficiency.py --lengths 4096 8192 --sp 2 4 --impls rsa colossalai-rsa --reps 2
"""

from __future__ import annotations

import argparse
import json

import peers
import torch
import torch.distributed as dist
import torch.nn.functional as F
from memlib import fastest_step, fixed_mmap_threshold, measure_step, run_ranks

HEADS, HEAD_DIM = 12, 64
IMPLS = ("ring", "rsa", "ulysses", *peers.PEERS)
RSAS = ("rsa", "colossalai-rsa")  # L/sp x L scores: up to --max-rsa-len only


def _inputs(seq_len: int, sp: int, rank: int, seed: int = 0):
    """This rank's (q, k, v) leaves in a model's layout: (B, T, H, D) memory, as the projections make them (each
    attention takes `.transpose(1, 2)` views, (B, H, T, D))."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, seq_len, HEADS, HEAD_DIM, generator=g) for _ in range(3))
    chunk = seq_len // sp
    return [t[:, rank * chunk:(rank + 1) * chunk].clone().requires_grad_() for t in (q, k, v)]


def _attention(impl: str, group):
    if impl in peers.PEERS:
        return peers.attention(impl, group)
    from seqpar.parallel.sequence import sequence_attention

    return sequence_attention(impl, group)


def _step(impl: str, seq_len: int, causal: bool):
    sp, rank = dist.get_world_size(), dist.get_rank()
    leaves = _inputs(seq_len, sp, rank)
    if impl == "sdpa":
        def step():
            q, k, v = (x.transpose(1, 2) for x in leaves)
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
        return step
    attn = _attention(impl, dist.group.WORLD)

    def step():
        q, k, v = (x.transpose(1, 2) for x in leaves)
        attn(q, k, v, causal=causal, key_padding_mask=None, dropout_p=0.0).sum().backward()

    return step


def _ring_parts(seq_len: int, causal: bool):
    """(compute-only step, communication-only step) of bidirectional ring attention on this rank: the same block
    kernels, merges and gradient adds as `seqpar.parallel.sequence.ring` (head group by head group in backward
    from `LEAN_MIN_BYTES` on), and the same exchanges."""
    from seqpar.parallel.comm import RingExchange
    from seqpar.parallel.sequence import ring as ring_attention
    from seqpar.parallel.sequence.kernels import block_backward, block_forward, merge_into
    from seqpar.parallel.sequence.ring_blocks import head_groups

    sp, rank = dist.get_world_size(), dist.get_rank()
    q, k, v = (t.detach().transpose(1, 2) for t in _inputs(seq_len, sp, rank))
    lean = k.numel() * k.element_size() >= ring_attention.LEAN_MIN_BYTES
    groups = [h for h, _ in head_groups(k.shape[1], q.shape[1])] if lean else [slice(None)]

    def grouped(i: int) -> list[slice]:  # how block i's backward is split (see ring._lean_backward)
        return groups if lean and not (i == 0 and sp == 2) else [slice(None)]

    def compute():
        out, lse = block_forward(q, k, v, False, None)
        for _ in range(sp - 1):
            merge_into(out, lse, *block_forward(q, k, v, False, None))
        dout = torch.ones_like(q)
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        for i in range(sp):
            for h in grouped(i):
                g = block_backward(dout[:, h], q[:, h], k[:, h], v[:, h], out[:, h], lse[:, h].contiguous(), False, None)
                for acc, x in zip((dq, dk, dv), g, strict=True):
                    acc[:, h] = x if i == 0 else acc[:, h] + x

    def communicate():
        kb, vb, dk, dv = k, v, torch.zeros_like(k), torch.zeros_like(v)
        ring, dring = RingExchange(dist.group.WORLD, tag=0), RingExchange(dist.group.WORLD, tag=1)
        for _ in range(sp - 1):  # forward: the key/value blocks
            kb, vb = ring.start(kb, vb).wait()
        for i in range(sp):  # backward: the blocks again (a head group at a time when lean) and the accumulators
            if i < sp - 1:
                for h in grouped(i):
                    ring.start(kb[:, h], vb[:, h]).wait()
            if lean:
                (dk,) = dring.start(dk).wait()
                (dv,) = dring.start(dv).wait()
            else:
                dk, dv = dring.start(dk, dv).wait()

    return compute, communicate


def _rank(impl: str, seq_len: int, causal: bool, threads: int, reps: int, out_path: str) -> None:
    fixed_mmap_threshold()
    torch.set_num_threads(threads)
    _step(impl, 512 * dist.get_world_size(), causal)()  # warm-up at a short length: kernels, autograd, buffers
    step = _step(impl, seq_len, causal)
    measure_step(step, out_path)  # peak memory and time of the first step (rank 0 writes them)
    row = {"seconds": fastest_step(step, reps - 1)} if reps > 1 else {}
    if impl == "ring" and dist.get_world_size() > 1 and not causal:
        compute, communicate = _ring_parts(seq_len, causal)
        row["compute_s"], row["comm_s"] = fastest_step(compute, reps), fastest_step(communicate, reps)
    if dist.get_rank() == 0:
        with open(out_path) as f:
            first = json.load(f)
        row = {"peak_mib": first["peak_mib"], "seconds": min(first["seconds"], row.get("seconds", float("inf"))),
               **{k: v for k, v in row.items() if k != "seconds"}}
        if "comm_s" in row:
            hidden = row["compute_s"] + row["comm_s"] - row["seconds"]
            row["overlap"] = max(0.0, min(1.0, hidden / row["comm_s"]))
        with open(out_path, "w") as f:
            json.dump(row, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    ap.add_argument("--sp", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--reps", type=int, default=1, help="timed steps per row (the fastest is reported)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the single-process SDPA baseline")
    ap.add_argument("--causal", action="store_true", help="causal attention (zigzag ring)")
    ap.add_argument("--max-rsa-len", type=int, default=8192,
                    help="longest length for rsa and colossalai-rsa, whose L/sp x L scores outgrow memory (fp32: 12 x L^2 / sp x 4 B)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    impls = []
    for impl in args.impls:
        why = peers.missing(impl, args.causal) if impl in peers.PEERS else None
        if why:
            print(f"skipping {why}", flush=True)
        else:
            impls.append(impl)
    rows = []
    for seq_len in args.lengths:
        base = run_ranks(_rank, 1, "sdpa", seq_len, args.causal, args.threads, args.reps, timeout=args.timeout)
        rows.append({"impl": f"sdpa ({args.threads} threads)", "sp": 1, "seq_len": seq_len, **base})
        print(json.dumps(rows[-1]), flush=True)
        for sp in args.sp:
            for impl in impls:
                if impl in RSAS and seq_len > args.max_rsa_len:
                    continue
                r = run_ranks(_rank, sp, impl, seq_len, args.causal, 1, args.reps, timeout=args.timeout)
                rows.append({"impl": impl, "sp": sp, "seq_len": seq_len, **r,
                             "vs_sdpa": r["seconds"] / base["seconds"]})
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
