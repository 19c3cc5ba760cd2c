"""What the ranks do together around a checkpoint: who they are, gathering one value from each, a failure as one
line instead of an exception (so every rank can learn of it), and DCP in a single process."""

from __future__ import annotations

import contextlib
import warnings

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(obj) -> list:
    """`obj` from every rank, in rank order (a collective: every rank calls it)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def world_barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def describe(e: BaseException) -> str:
    """One line for a failure; DCP's CheckpointException shows the first failing rank's own error."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = min(failures.items())[1][0]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def attempt(fn, *args) -> str | None:
    """Run `fn`; its failure as one line instead of an exception (DCP's is a BaseException)."""
    try:
        fn(*args)
    except (Exception, CheckpointException) as e:
        return describe(e)
    return None


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns that it runs without a process group, which is what one process means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
