"""Starting the processes of a job: join a launcher (torchrun, srun) or start them here.

`python train.py parallel.sp=4` runs as written. `launch(fn, world, *args)` decides how:

- under **torchrun** (RANK and WORLD_SIZE set) or **srun** with more than one task (SLURM_PROCID, SLURM_NTASKS,
  SLURM_LOCALID; the master is the first host of SLURM_JOB_NODELIST) this process is one rank: it initialises
  torch.distributed and calls `fn` once;
- otherwise, if the job needs more than one process, it starts `world` local processes (forked with gloo on CPU,
  spawned with one GPU each on CUDA) and waits for them.

Only rank 0 writes to stdout. A rank that raises prints its traceback on stderr; here the parent then stops every
other rank (SIGTERM, then SIGKILL after a grace period) and exits non-zero with that rank's error, so a dead peer
never leaves the job hanging. Under torchrun or srun the launcher stops the other ranks (torchrun does by itself;
use `srun --kill-on-bad-exit=1`); a rank stuck in a collective fails after `timeout_s` (the process-group timeout).
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import re
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqpar.errors import UserError
from seqpar.parallel.signals import SignalForwarder, StopSignal
from seqpar.torch_compat import default_store

GRACE_S = 10.0  # how long ranks get to stop by themselves after another rank failed


@dataclass
class RankInfo:
    rank: int
    world: int
    local_rank: int
    local_world: int
    master_addr: str
    master_port: int


class RankFailed(RuntimeError):
    """A rank of a locally started job failed; `message` is its error, `exit_code` the job's exit code."""

    def __init__(self, rank: int, message: str, exit_code: int = 1):
        super().__init__(f"rank {rank} failed: {message}")
        self.rank, self.message, self.exit_code = rank, message, exit_code


def resolve_device(name: str) -> torch.device:
    """`device` (auto|cpu|cuda) as a torch device; on CUDA, this process's current GPU (set by the launcher)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device", "is cuda but no CUDA device is visible", "use device=cpu or device=auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read SLURM_JOB_NODELIST {nodelist!r}")
    prefix, ranges = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def launched_rank(env=os.environ) -> RankInfo | None:
    """This process's place in a job started by torchrun or srun, or None if nothing launched it."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return RankInfo(
            int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world)),
            env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
        )
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" in env and ntasks > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = int(env.get("SLURM_JOB_ID", 0))
        local_world = int((env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0])
        return RankInfo(
            int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", 0)), local_world,
            env.get("MASTER_ADDR") or first_host(nodes), int(env.get("MASTER_PORT") or 20000 + job % 20000),
        )
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(info: RankInfo, device_type: str, timeout_s: float) -> None:
    """Set this rank's device and threads and join the process group (NCCL on CUDA, gloo on CPU). The rank's
    place is also put in the environment as torchrun would (libraries such as DeepSpeed read LOCAL_RANK)."""
    faulthandler.enable()  # a crash in native code (a segfault) prints every thread's Python stack
    for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world), ("LOCAL_RANK", info.local_rank),
                       ("LOCAL_WORLD_SIZE", info.local_world), ("MASTER_ADDR", info.master_addr),
                       ("MASTER_PORT", info.master_port)):
        os.environ[key] = str(value)
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    else:  # $OMP_NUM_THREADS, applied here too: torch reads it only if it was set before torch was imported
        threads = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                              else max(1, (os.cpu_count() or 1) // info.local_world))
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _quiet_unless_rank0(rank: int) -> None:
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        import warnings

        warnings.simplefilter("ignore")


def _local_worker(local_rank, world, port, device_type, timeout_s, errors, done, fn, args):
    info = RankInfo(local_rank, world, local_rank, world, "127.0.0.1", port)
    _quiet_unless_rank0(local_rank)
    try:
        init_distributed(info, device_type, timeout_s)
        fn(*args)
        dist.barrier()
    except BaseException as e:
        errors.put((time.time(), local_rank, *_describe(e)))
        print(f"[rank {local_rank}] {traceback.format_exc()}", file=sys.stderr, flush=True)
        os._exit(1)  # no clean-up: peers may be blocked in a collective; the parent stops them
    dist.destroy_process_group()
    # Nobody exits until every rank has torn down its process group (an early exit can abort a peer's teardown).
    try:
        done.wait(timeout=60)
    except Exception:
        pass


def _describe(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit code): an error meant for the user (a configuration error, exit 2; an aborted
    training, exit 3: any exception with an `exit_code`) keeps its own text; others show their type, exit 1."""
    code = getattr(e, "exit_code", None)
    if isinstance(code, int):
        return str(e), code
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": "), 1


def start_method(device_type: str) -> str:
    """How local ranks start: forked on CPU (they inherit this process's imports and any data it built, and start
    in a fraction of a second), spawned on CUDA (CUDA cannot be used in a forked child)."""
    return "fork" if device_type == "cpu" and sys.platform == "linux" else "spawn"


def launch_local(fn, world: int, *args, device_type: str = "cpu", timeout_s: float = 1800.0,
                 deadline_s: float | None = None, stop: StopSignal | None = None) -> None:
    """Run `fn(*args)` on `world` local processes, each one rank of a fresh process group. A preemption signal
    sent to this process goes on to the ranks; one that reaches a forked rank before its trainer listens is
    recorded in its copy of `stop`.

    Raises RankFailed with the first failing rank's error (the others are stopped), or TimeoutError after
    `deadline_s` seconds if given.
    """
    import torch.multiprocessing as mp

    method = start_method(device_type)
    if method == "fork":
        import torch._dynamo  # noqa: F401 - the optimizer imports it; once here instead of once per rank

        # tokenizers' thread pool does not survive a fork; say so instead of letting it warn in every rank.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    ctx = mp.get_context(method)
    errors, done = ctx.SimpleQueue(), ctx.Barrier(world)
    port = int(os.environ.get("MASTER_PORT") or free_port())
    forward = SignalForwarder(stop)
    try:
        pc = mp.start_processes(
            _local_worker, args=(world, port, device_type, timeout_s, errors, done, fn, args),
            nprocs=world, join=False, start_method=method,
        )
    except BaseException:
        forward.restore()  # else this process would keep passing its SIGTERM on to no one
        raise
    forward.processes = pc.processes
    start = time.monotonic()
    try:
        while True:
            failed = [(i, p.exitcode) for i, p in enumerate(pc.processes) if p.exitcode not in (None, 0)]
            if failed:
                break
            if all(p.exitcode == 0 for p in pc.processes):
                return
            if deadline_s is not None and time.monotonic() - start > deadline_s:
                raise TimeoutError(f"the job did not finish within {deadline_s:.0f} s")
            time.sleep(0.1)
        _stop(pc.processes, GRACE_S)
        raise _root_cause(dict(failed), errors)
    finally:
        forward.restore()
        _stop(pc.processes, 0.0)
        pc = errors = done = None  # release the queue's and barrier's semaphores now, not at interpreter exit


def _root_cause(failed: dict[int, int], errors) -> RankFailed:
    """The failure that started it, from the exit codes seen when the failure was noticed: a rank that died
    without a Python error (its peers' errors are only "connection closed"), else the earliest error reported."""
    reported = {}
    while not errors.empty():
        when, rank, message, code = errors.get()
        reported[rank] = (when, message, code)
    for rank, code in failed.items():
        if rank not in reported:
            return RankFailed(rank, f"exited with code {code} (killed or crashed without a Python error)")
    rank, (_, message, code) = min(reported.items(), key=lambda kv: kv[1][0])
    return RankFailed(rank, message, code)


def _stop(processes, grace_s: float) -> None:
    """Give live processes `grace_s` to exit, then SIGTERM, then SIGKILL."""
    end = time.monotonic() + grace_s
    while any(p.is_alive() for p in processes) and time.monotonic() < end:
        time.sleep(0.05)
    for p in processes:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + 5.0
    while any(p.is_alive() for p in processes) and time.monotonic() < end:
        time.sleep(0.05)
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join()


def run_joined(info: RankInfo, fn, *args, device_type: str = "cpu", timeout_s: float = 1800.0,
               stop: StopSignal | None = None) -> None:
    """This process is one rank of a job started by torchrun or srun: join, run, tear down.

    SIGUSR1 (SLURM's warning ahead of preemption or the time limit) is recorded in `stop` for the rank's whole
    life: before the trainer listens, the trainer honours it at its first step; after training, while the rank
    exports and tears down, it has nothing left to do (the default action would kill this rank in the middle of
    the final collective and fail a finished job)."""
    _quiet_unless_rank0(info.rank)
    signal.signal(signal.SIGUSR1, (stop or StopSignal()).record)
    init_distributed(info, device_type, timeout_s)
    try:
        fn(*args)
    except BaseException:
        print(f"[rank {info.rank}] {traceback.format_exc()}", file=sys.stderr, flush=True)
        raise  # no teardown: peers may be in a collective; the launcher stops them
    dist.barrier()
    store = default_store()  # rank 0 hosts it: it outlives the process group
    dist.destroy_process_group()
    # Nobody exits before every rank has torn down its process group: rank 0 leaving early (with the store it
    # hosts) could abort a peer's teardown ("terminate called without an active exception" in a finished job).
    store.add("seqpar/torn_down", 1)
    if info.rank == 0:
        deadline = time.monotonic() + 60
        while store.add("seqpar/torn_down", 0) < info.world and time.monotonic() < deadline:
            time.sleep(0.05)


def check_launched_world(world: int) -> None:
    """Under torchrun or srun, the launcher's process count must be the mesh's `world` (dp*pp*tp*sp)."""
    info = launched_rank()
    if info is not None and info.world != world:
        raise UserError(
            "parallel",
            f"dp*pp*tp*sp = {world} but the launcher started {info.world} processes",
            f"launch {world} processes (torchrun --nproc-per-node / srun --ntasks) or change the degrees",
        )


def launch(fn, world: int, *args, device_type: str = "cpu", timeout_s: float = 1800.0,
           stop: StopSignal | None = None) -> None:
    """Run `fn(*args)` as every rank of a `world`-process job: joined, spawned here, or in this process. `stop`
    (which `args` may also hold) records a preemption signal that reaches a rank before it listens itself."""
    info = launched_rank()
    if info is not None:
        check_launched_world(world)
        run_joined(info, fn, *args, device_type=device_type, timeout_s=timeout_s, stop=stop)
    elif world > 1:
        launch_local(fn, world, *args, device_type=device_type, timeout_s=timeout_s, stop=stop)
    else:
        fn(*args)
