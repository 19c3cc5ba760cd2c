#!/usr/bin/env python
"""Peak memory of one single-device attention forward + backward with document masking: the dense (B, 1, T, T)
mask against `document_attention`'s query tiles.

Documents follow the built-in corpus's lengths as in doc_mask.py (`document_lengths`: its documents in a seeded
order, --chars-per-token characters a token, packed into one window of --seq-len tokens). Shape: batch 1, --heads
query heads of --head-dim, --kv-heads key/value heads, fp32, causal, one thread. Each variant runs in a fresh process
(spawned); its number is the peak resident memory during forward + backward above what was live before (q, k, v and
the output gradient), as memlib measures it: the high-water mark reset through /proc/self/clear_refs, allocations
above 128 KiB mmapped so that freed memory returns at once.

    python scripts/bench/doc_mask_memory.py --seq-len 16384
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time


def _measure(variant: str, lengths: list[int], heads: int, kv_heads: int, head_dim: int, queue) -> None:
    import gc

    import torch
    from memlib import _rss_kib, fixed_mmap_threshold

    from seqpar.models.attention import document_attention, sdpa_attention

    fixed_mmap_threshold()
    torch.set_num_threads(1)
    t = sum(lengths)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]  # (1, T)
    q = torch.randn(1, heads, t, head_dim, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, t, head_dim, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, heads, t, head_dim)
    if variant == "dense":  # sdpa_attention's one (B, 1, T, T) mask, its path up to DENSE_DOCUMENT_TOKENS
        import seqpar.models.attention as attention

        attention.DENSE_DOCUMENT_TOKENS = t
    fn = document_attention if variant == "tiled" else sdpa_attention
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again from what is live now
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    out = fn(q, k, v, causal=True, key_padding_mask=None, dropout_p=0.0, document_ids=ids)
    out.backward(grad)
    seconds = time.perf_counter() - start
    queue.put({"variant": variant, "peak_mib": (_rss_kib("VmHWM") - base) / 1024, "seconds": seconds})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chars-per-token", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=["dense", "tiled"])
    args = ap.parse_args()
    from doc_mask import document_lengths

    (lengths,) = document_lengths(args.seq_len, 1, args.chars_per_token, args.seed)
    ctx = mp.get_context("spawn")
    for variant in args.variants:
        queue = ctx.Queue()
        p = ctx.Process(target=_measure, args=(variant, lengths, args.heads, args.kv_heads, args.head_dim, queue))
        p.start()
        row = queue.get()
        p.join()
        row.update(seq_len=args.seq_len, documents=len(lengths), longest_doc=max(lengths))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
