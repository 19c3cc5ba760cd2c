"""Shared helpers of the memory benchmarks: per-rank peak resident memory of one step, on local gloo ranks.

A rank's number is its peak resident set during the step above its resident set just before it (Linux: the
high-water mark is reset through /proc/self/clear_refs; allocations above 128 KiB are mmapped, so freed memory
returns to the OS at once and does not hide the next peak). The reported number is the maximum over ranks.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def fixed_mmap_threshold(nbytes: int = 131072) -> None:
    """glibc: serve allocations above `nbytes` by mmap (returned to the OS when freed), with no adaptive growth."""
    ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def measure_step(step, out_path: str) -> None:
    """Run `step()` on every rank; rank 0 writes {"peak_mib", "seconds"} (maxima over ranks) to `out_path`."""
    dist.barrier()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = (_rss_kib("VmHWM") - base) / 1024
    result = torch.tensor([peak, seconds], dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"peak_mib": result[0].item(), "seconds": result[1].item()}, f)


def fastest_step(step, reps: int) -> float:
    """The fastest of `reps` (at least one) runs of `step` on every rank, each the slowest rank's time."""
    times = []
    for _ in range(max(reps, 1)):
        dist.barrier()
        start = time.perf_counter()
        step()
        t = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    return min(times)


def run_ranks(fn, world: int, *args, timeout: float = 600.0) -> dict:
    """`fn(*args, out_path)` on `world` local gloo ranks; returns what rank 0 wrote."""
    from seqpar.parallel.launch import launch_local

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        launch_local(fn, world, *args, f.name, deadline_s=timeout)
        with open(f.name) as g:
            return json.load(g)


os.environ.setdefault("OMP_NUM_THREADS", "1")
