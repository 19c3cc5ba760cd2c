"""Checkpoints through the command line: preemption and exact resume, resharding into another layout, export.

Exact resume: the resumed run restores the weights, AdamW's moments and step counts, the learning-rate schedule,
the data loader's position and every rank's RNG state bit for bit, and CPU kernels are deterministic, so the
losses after the checkpoint equal the uninterrupted run's (asserted to 1e-6). Resharding into another layout changes
the order of floating-point sums, so it is held to the parity tolerance of the layout tests.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ..conftest import ROOT, cli_env
from .test_parallel_cli import GRAD_ATOL, LOSS_RTOL, final_weights
from .test_train_cli import assert_transformers_logits_match, read_metrics, train_ok

pytestmark = pytest.mark.slow

EXACT = 1e-6
COMMON = ["trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.threads=1",
          "trainer.warmup_steps=2", "model.num_layers=2"]  # one layer per pipeline stage at pp=2


def losses(run) -> dict[int, tuple[float, float]]:
    steps, _ = read_metrics(run)
    assert len({r["step"] for r in steps}) == len(steps), "a step was logged twice"
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in steps}


def assert_continues(resumed, reference, after: int, last: int, exact: bool) -> None:
    got, want = losses(resumed), losses(reference)
    assert sorted(s for s in got if s > after) == list(range(after + 1, last + 1)), sorted(got)
    for s in range(after + 1, last + 1):
        (loss, norm), (ref_loss, ref_norm) = got[s], want[s]
        if exact:
            assert abs(loss - ref_loss) <= EXACT and abs(norm - ref_norm) <= EXACT, (s, got[s], want[s])
        else:
            assert abs(loss - ref_loss) / ref_loss < LOSS_RTOL and abs(norm - ref_norm) < GRAD_ATOL, (s, got[s], want[s])


def checkpoints(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_gpt_preempted_by_sigterm_resumes_exactly_and_reshards(tmp_path, cache_dir):
    """GPT on dp=2 x tp=2: SIGTERM mid-run saves and exits 0; the same command continues from that step with the
    uninterrupted run's losses. A periodic checkpoint of that layout resumes on sp=4 (ring attention)."""
    args = ["model=gpt_tiny", "parallel.dp=2", "parallel.tp=2", "trainer.max_steps=6", "checkpoint.every=2",
            "checkpoint.keep=2", *COMMON]
    ref = tmp_path / "ref"
    train_ok([*args, f"hydra.run.dir={ref}"], cache_dir)
    assert checkpoints(ref) == ["step_00000004", "step_00000006"]  # checkpoint.keep=2: step 2 was removed

    run = tmp_path / "preempted"
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no step was logged"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "stopped by SIGTERM at step" in out
    stopped = int(checkpoints(run)[-1].removeprefix("step_"))
    assert 1 <= stopped < 6 and max(losses(run)) == stopped

    train_ok([*args, f"hydra.run.dir={run}"], cache_dir)  # the requeued job: checkpoint.resume=auto
    assert_continues(run, ref, stopped, 6, exact=True)

    resharded = tmp_path / "sp4"
    train_ok(["model=gpt_tiny", "parallel.sp=4", "trainer.max_steps=6", *COMMON,
              f"checkpoint.resume={ref / 'checkpoints' / 'step_00000004'}", f"hydra.run.dir={resharded}"], cache_dir)
    assert_continues(resharded, ref, 4, 6, exact=False)


def test_bert_resumes_exactly_reshards_and_exports(tmp_path, cache_dir):
    """BERT on pp=2 x tp=2: resume from step 2 in the same layout (exact) and on dp=4 (parity); the step-4
    checkpoint exports to a BertForMaskedLM with the run's final weights and our logits."""
    args = ["model=bert_tiny", "trainer.max_steps=4", *COMMON]
    ref = tmp_path / "ref"
    train_ok([*args, "parallel.pp=2", "parallel.tp=2", "checkpoint.every=2", f"hydra.run.dir={ref}"], cache_dir)
    step2 = ref / "checkpoints" / "step_00000002"
    for name, layout, exact in (("same", ["parallel.pp=2", "parallel.tp=2"], True), ("dp4", ["parallel.dp=4"], False)):
        run = tmp_path / name
        train_ok([*args, *layout, f"checkpoint.resume={step2}", f"hydra.run.dir={run}"], cache_dir)
        assert_continues(run, ref, 2, 4, exact=exact)

    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "seqpar.export", str(ref / "checkpoints"), str(out)], cwd=ROOT,
                          env=cli_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    again = subprocess.run([sys.executable, "-m", "seqpar.export", str(step2), str(out)], cwd=ROOT,
                           env=cli_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip() == (
        f"error: out_dir ({out}) exists and is not empty; choose a new output directory")
    exported, final = load_file(str(out / "model.safetensors")), final_weights(ref)
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)

    assert_transformers_logits_match(out, ref / "final_model")
    assert json.loads((step2 / "meta.json").read_text())["layout"]["pp"] == 2
