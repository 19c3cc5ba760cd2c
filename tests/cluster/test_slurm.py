"""seqpar on a real SLURM cluster (slurmctld + two slurmd on this host): the sbatch script across nodes and tasks,
preemption with requeue and resume, and a Hydra submitit sweep. Each run must give the local run's numbers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ..conftest import ROOT, cli_env
from ..e2e.test_parallel_cli import GRAD_ATOL, LOSS_RTOL
from ..e2e.test_train_cli import read_metrics, train_ok

pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.slow]  # one worker starts the one test cluster and runs these

STEPS = ["model=gpt_tiny", "trainer.max_steps=6", "trainer.log_every=1", "trainer.eval_every=0",
         "trainer.eval_batches=1", "trainer.threads=1", "trainer.warmup_steps=2", "checkpoint.at_end=false"]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
STANDIN_BIN = Path(__file__).parent / "bin"  # `sacct` answered from scontrol (no accounting here)


def job_env(cache_dir) -> dict[str, str]:
    env = cli_env(cache_dir)
    env.update(SEQPAR_HOME=str(ROOT), PATH=f"{STANDIN_BIN}:{Path(sys.executable).parent}:{env['PATH']}")
    return env


def assert_matches(run: Path, ref: Path, label: str) -> None:
    (steps, _), (want, _) = read_metrics(run), read_metrics(ref)
    assert [r["step"] for r in steps] == [r["step"] for r in want], label
    for a, b in zip(steps, want, strict=True):
        assert abs(a["loss"] - b["loss"]) / b["loss"] < LOSS_RTOL, (label, a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < GRAD_ATOL, (label, a, b)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("local")
    train_ok([*STEPS, "trainer.save_final=false", f"hydra.run.dir={run}"], cache_dir)
    return run


def test_sbatch_across_nodes_and_tasks_with_preemption(tmp_path, slurm, cache_dir, local_run):
    """2 nodes x 1 task (dp=2) and 1 node x 2 tasks (sp=2, ring attention) through scripts/slurm/train.sbatch.
    The second job gets SLURM's preemption notice (USR1 to the batch script) after its first step: it checkpoints,
    requeues itself and the restarted job resumes; both jobs log the local single-process run's losses."""
    env = job_env(cache_dir)
    dp_job = slurm.sbatch("--nodes=2", "--ntasks-per-node=1", str(SBATCH), *STEPS, "parallel.dp=2", cwd=tmp_path,
                          env=env)
    sp_job = slurm.sbatch("--nodes=1", "--ntasks-per-node=2", str(SBATCH), *STEPS, "parallel.sp=2", cwd=tmp_path,
                          env=env)
    sp_run = tmp_path / "runs" / f"seqpar-{sp_job}"
    deadline = time.monotonic() + 120
    while not ((sp_run / "metrics.jsonl").exists() and (sp_run / "metrics.jsonl").read_text().strip()):
        assert time.monotonic() < deadline and slurm.job(sp_job).get("JobState") in ("PENDING", "RUNNING"), \
            slurm.job(sp_job)
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", "--batch", sp_job)  # the requeued job restarts after cred_expire (5 s)

    for job, label in ((dp_job, "dp=2 on 2 nodes"), (sp_job, "sp=2 on 2 tasks, preempted")):
        info = slurm.wait(job, timeout=240)
        log = (tmp_path / f"seqpar-{job}.log").read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
        assert_matches(tmp_path / "runs" / f"seqpar-{job}", local_run, label)
    log = (tmp_path / f"seqpar-{sp_job}.log").read_text()
    assert "stopped by SIGUSR1 at step" in log and "(restart 1)" in log and "resumed from" in log, log[-3000:]
    assert slurm.job(sp_job)["Restarts"] == "1"
    assert "on sp[1-2], 2 tasks" in (tmp_path / f"seqpar-{dp_job}.log").read_text()


def test_submitit_sweep_returns_every_run(tmp_path, slurm, cache_dir, local_run):
    """`python train.py -m cluster=slurm parallel.sp=1,2`: one SLURM job per run, each with sp tasks."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "cluster=slurm", "parallel.sp=1,2", *STEPS,
         f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"],
        cwd=ROOT, env={**job_env(cache_dir), "SLURM_CONF": str(slurm.conf)}, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for num, sp in (("0", 1), ("1", 2)):
        overrides = yaml.safe_load((sweep / num / ".hydra" / "overrides.yaml").read_text())
        assert f"parallel.sp={sp}" in overrides
        assert_matches(sweep / num, local_run, f"submitit sp={sp}")
    submitted = sorted((sweep / ".submitit").glob("*_1/*_result.pkl"))
    assert submitted, "submitit returned no result for the second run"
    assert json.loads((sweep / "1" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
