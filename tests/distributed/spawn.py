"""Run a test body on N local gloo processes (one thread each) from pytest, with a hard timeout."""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, errors) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Call `fn(rank, world, *args)` in `world` processes; re-raise the first rank's failure here."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    pc = mp.start_processes(_entry, args=(world, free_port(), fn, args, errors), nprocs=world, join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + timeout
    try:
        while not pc.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed test did not finish within {timeout} s")
    except mp.ProcessRaisedException as e:
        raise AssertionError(errors.get() if not errors.empty() else str(e)) from None
    finally:
        for p in pc.processes:
            if p.is_alive():
                p.kill()
