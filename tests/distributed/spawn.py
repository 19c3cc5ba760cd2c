"""Run a test body on N local gloo processes (one thread each) from pytest, with a hard timeout.

It uses the project's own launcher (`seqpar.parallel.launch.launch_local`), so these tests also exercise its
start-up, failure propagation and teardown.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.parallel.launch import RankFailed, launch_local


def _call(fn, args) -> None:
    torch.set_num_threads(1)
    fn(dist.get_rank(), dist.get_world_size(), *args)


def spawn(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Call `fn(rank, world, *args)` in `world` processes; a rank's failure fails the test with its message."""
    try:
        launch_local(_call, world, fn, args, timeout_s=timeout, deadline_s=timeout)
    except RankFailed as e:
        raise AssertionError(str(e)) from None
