#!/usr/bin/env python
"""Bytes a sequence-parallel attention sends per rank with grouped-query attention: one forward + backward of
ring, rsa and ulysses at sp ranks, 12 query heads of 64 and 12 / 4 / 1 key/value heads (fp32, causal, batch 1),
counted at the point-to-point and all-to-all calls (what `batch_isend_irecv` and `all_to_all_single` are handed),
with the time of the step (the slowest rank, fastest of --reps).

    python scripts/bench/gqa_ring_bytes.py --seq-len 8192 --sp 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from memlib import run_ranks

HEADS, HEAD_DIM = 12, 64


def _count_sent(counter: list[int]):
    """Wrap the collectives ring/rsa/ulysses call so that each adds the bytes it sends to counter[0]."""
    isend_irecv, all_to_all = dist.batch_isend_irecv, dist.all_to_all_single

    def batch_isend_irecv(ops):
        counter[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return isend_irecv(ops)

    def all_to_all_single(output, input, *args, **kwargs):
        counter[0] += input.numel() * input.element_size() * (dist.get_world_size() - 1) // dist.get_world_size()
        return all_to_all(output, input, *args, **kwargs)

    dist.batch_isend_irecv, dist.all_to_all_single = batch_isend_irecv, all_to_all_single


def _rank(impl: str, seq_len: int, kv_heads: int, reps: int, out_path: str) -> None:
    from seqpar.parallel.sequence import sequence_attention

    torch.set_num_threads(1)
    sp, rank = dist.get_world_size(), dist.get_rank()
    counter = [0]
    _count_sent(counter)
    g = torch.Generator().manual_seed(rank)
    c = seq_len // sp
    q = torch.randn(1, HEADS, c, HEAD_DIM, generator=g).requires_grad_()
    k, v = (torch.randn(1, kv_heads, c, HEAD_DIM, generator=g).requires_grad_() for _ in range(2))
    attn = sequence_attention(impl, dist.group.WORLD)
    times = []
    for _ in range(reps):
        counter[0] = 0
        dist.barrier()
        start = time.perf_counter()
        attn(q, k, v, causal=True, key_padding_mask=None, dropout_p=0.0).sum().backward()
        t = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    sent = torch.tensor([counter[0]], dtype=torch.float64)
    dist.all_reduce(sent, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"sent_mib": sent.item() / 2**20, "seconds": min(times)}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--sp", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[12, 4, 1])
    parser.add_argument("--impls", nargs="+", default=["ring", "rsa", "ulysses"])
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    print(f"seq_len {args.seq_len}, sp {args.sp}, {HEADS} query heads of {HEAD_DIM}, fp32, causal, forward + backward")
    print("impl     kv heads  sent MiB/rank  step s")
    for impl in args.impls:
        for kv in args.kv_heads:
            r = run_ranks(_rank, args.sp, impl, args.seq_len, kv, args.reps)
            print(f"{impl:8} {kv:8}  {r['sent_mib']:13.1f}  {r['seconds']:6.2f}")


if __name__ == "__main__":
    main()
