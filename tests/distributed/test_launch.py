"""The launcher: rank detection under torchrun/srun, and a failing or dead rank ending a local job quickly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from seqpar.parallel.launch import RankFailed, first_host, free_port, launch_local, launched_rank


def _raise_on_rank1() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank one broke on purpose")
    dist.all_reduce(torch.ones(1))  # rank 0 blocks here, waiting for a peer that is gone


def _die_on_rank2() -> None:
    if dist.get_rank() == 2:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def _sigkill_rank1() -> None:
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(1))


def _ok(path: str) -> None:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            f.write(str(t.item()))


def test_a_rank_that_raises_ends_the_job_with_its_message():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 failed: ValueError: rank one broke on purpose") as e:
        launch_local(_raise_on_rank1, 2, deadline_s=90)
    assert e.value.exit_code == 1
    assert time.monotonic() - start < 60  # the blocked peer is stopped, not waited for


def test_a_rank_that_dies_ends_the_job():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 2 failed: exited with code 3"):
        launch_local(_die_on_rank2, 3, deadline_s=90)
    assert time.monotonic() - start < 60


def test_a_sigkilled_rank_ends_the_job():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 failed: exited with code -9 \(killed"):
        launch_local(_sigkill_rank1, 2, deadline_s=90)
    assert time.monotonic() - start < 60


def test_a_healthy_job_runs_every_rank(tmp_path):
    out = tmp_path / "sum"
    launch_local(_ok, 3, str(out), deadline_s=90)
    assert out.read_text() == "3.0"


def test_rank_detection_from_launcher_variables():
    assert launched_rank({}) is None
    assert launched_rank({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # one task: start processes here
    tr = launched_rank({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                        "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world, tr.local_rank, tr.local_world, tr.master_addr, tr.master_port) == (3, 8, 1, 4, "n1", 1234)
    sl = launched_rank({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS_PER_NODE": "4"})
    assert (sl.rank, sl.world, sl.local_rank, sl.local_world, sl.master_addr, sl.master_port) == (
        5, 8, 1, 4, "gpu07", 24242)


@pytest.mark.parametrize("nodes,host", [("node1", "node1"), ("gpu[03-05,09]", "gpu03"), ("a[1,2],b3", "a1"),
                                        ("c-12", "c-12"), ("x[010-011]", "x010")])
def test_first_host_of_a_slurm_nodelist(nodes, host):
    assert first_host(nodes) == host


LATE_SIGNAL = """
import os, signal, sys
from seqpar.parallel.launch import launch
from seqpar.parallel.signals import StopSignal

def job(stop):
    os.kill(os.getpid(), signal.SIGUSR1)  # before the trainer listens: remembered for it
    with stop.listening():  # as the trainer's fit() does
        early = stop.signum
    os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning while the rank exports and tears down
    with open(sys.argv[1] + os.environ["RANK"], "w") as f:
        f.write(str(early))

stop = StopSignal()
launch(job, 2, stop, stop=stop)
with open(sys.argv[1] + os.environ["RANK"], "a") as f:
    f.write(" finished")
"""


def test_a_late_usr1_does_not_kill_a_launched_rank_and_an_early_one_is_kept(tmp_path):
    """Ranks started by torchrun/srun (RANK/WORLD_SIZE set): SIGUSR1 before the trainer listens is handed to it;
    SIGUSR1 after training (SLURM's preemption warning) must not kill a rank in the final barrier."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", LATE_SIGNAL, str(tmp_path / "rank")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    for r, p in enumerate(procs):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert (tmp_path / f"rank{r}").read_text() == f"{int(signal.SIGUSR1)} finished"


def _threads(path: str) -> None:
    with open(f"{path}.{dist.get_rank()}", "w") as f:
        f.write(str(torch.get_num_threads()))


def test_ranks_take_their_thread_count_from_omp_num_threads_even_when_set_after_import(tmp_path, monkeypatch):
    """$OMP_NUM_THREADS set after torch was imported (a benchmark script's setdefault) still gives each rank that
    many threads; unset, the cores are shared between the local ranks. More threads than cores made every rank's
    idle threads spin while its peer needed the core (a ring benchmark step ran 8x slower)."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    launch_local(_threads, 2, str(tmp_path / "set"), deadline_s=90)
    assert [(tmp_path / f"set.{r}").read_text() for r in range(2)] == ["3", "3"]
    monkeypatch.delenv("OMP_NUM_THREADS")
    launch_local(_threads, 2, str(tmp_path / "unset"), deadline_s=90)
    want = str(max(1, (os.cpu_count() or 1) // 2))
    assert [(tmp_path / f"unset.{r}").read_text() for r in range(2)] == [want, want]
    assert torch.get_num_threads() == before  # the parent's own count is untouched


def test_a_launch_that_cannot_start_its_ranks_gives_the_signals_back(monkeypatch):
    """The launcher forwards SIGTERM/SIGUSR1 to its ranks; if the ranks cannot be started, this process gets its
    own handlers back (else it would pass its SIGTERM on to no one, and every process it forks later inherits that)."""
    import torch.multiprocessing as mp

    def fails(*a, **k):
        raise OSError("cannot start")

    monkeypatch.setattr(mp, "start_processes", fails)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(OSError, match="cannot start"):
        launch_local(_ok, 2, "unused")
    assert {s: signal.getsignal(s) for s in before} == before
