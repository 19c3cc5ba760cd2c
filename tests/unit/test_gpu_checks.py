"""The GPU check's own logic on CPU (`scripts/bench/gpu_checks.sh` and its Python parts), so it works when a GPU
run comes: ring attention with its ranks as threads against SDPA (and a corrupted exchange caught), the loss
comparisons, pytest's junit summary, the merge of the parts' results and their bundle, and the install from a
folder of wheels with no package index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from unittest import mock

import pytest

from ..conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "bench"))
import gpu_checks  # noqa: E402
import gpu_ring  # noqa: E402

sys.path.pop(0)


def _cases(**match):
    return [c for c in gpu_ring.ring_cases("cpu") if all(c[k] == v for k, v in match.items())]


@pytest.mark.parametrize("world", [2, 4])
def test_ring_in_one_process_matches_sdpa(world):
    """Causal and bidirectional, padded or not, plain and lean backward, fp32 and bf16 (sp=4: grouped-query)."""
    rows = [gpu_ring.run_case(c, "cpu") for c in _cases(world=world)]
    assert len(rows) == 16
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_ring_check_catches_a_corrupted_exchange():
    """The key/value gradients, off by 0.1% on their way round the ring, fail every case."""
    start = gpu_ring.LocalExchange.start

    def corrupt(self, *tensors):
        return start(self, *[t * 1.001 if self.tag == 1 else t for t in tensors])

    with mock.patch.object(gpu_ring.LocalExchange, "start", corrupt):
        rows = [gpu_ring.run_case(c, "cpu") for c in _cases(world=2, dtype="float32", padded=False)]
    assert not any(r["ok"] for r in rows)


def test_loss_comparisons():
    fp32 = {s: 10.0 - 0.01 * s for s in range(1, 51)}
    bf16 = {s: v * 1.01 for s, v in fp32.items()}
    assert gpu_checks._compare_precisions(bf16, fp32, 0.02)["ok"]
    assert not gpu_checks._compare_precisions({s: v * 1.03 for s, v in fp32.items()}, fp32, 0.02)["ok"]
    same = gpu_checks._compare_resume(fp32, dict(fp32), 20, 0.01)
    assert same["ok"] and same["equal"] and same["steps_compared"] == [21, 50] and same["before_kill_equal"]
    drift = gpu_checks._compare_resume(fp32, {**fp32, 30: fp32[30] * 1.02}, 20, 0.01)
    assert not drift["ok"] and not drift["equal"]
    assert not gpu_checks._compare_resume(fp32, {s: v for s, v in fp32.items() if s <= 20}, 20, 0.01)["ok"]


def test_junit_summary(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="x"/>'
                   '<testcase classname="a" name="y"><skipped message="needs a CUDA device"/></testcase>'
                   '</testsuite></testsuites>')
    args = gpu_checks.parser().parse_args(["junit", "--device", "cpu", str(xml)])
    report = gpu_checks.cmd_junit(args)
    assert report["ok"] and report["passed"] == 1 and report["skipped_tests"] == 1 and report["skipped"] == "cpu"
    xml.write_text('<testsuite><testcase classname="a" name="x"><failure message="boom"/></testcase></testsuite>')
    assert gpu_checks.cmd_junit(args)["failed"] == ["a::x"]


def test_merge_records_every_part(tmp_path):
    """A part's JSON with its status; a part cut off by its time cap (no JSON) fails with its log's tail; a part
    with a non-zero exit fails even if its JSON says ok."""
    (tmp_path / "status.tsv").write_text("ring\t0\t12\tpython ring\ntrain\t124\t200\tpython train\n"
                                         "mfu\t1\t30\tpython mfu\n")
    (tmp_path / "ring.json").write_text(json.dumps({"ok": True, "cases": 32}))
    (tmp_path / "mfu.json").write_text(json.dumps({"ok": True}))
    (tmp_path / "train.log").write_text("step 150 ...")
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "H200"}))
    assert gpu_checks.main(["merge", str(tmp_path)]) == 1
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["summary"] == {"ring": "ok", "train": "FAILED", "mfu": "FAILED"} and r["env"] == {"gpu": "H200"}
    assert r["parts"]["ring"]["cases"] == 32 and r["parts"]["ring"]["seconds"] == 12.0
    assert r["parts"]["train"]["timed_out"] and "time cap" in r["parts"]["train"]["error"]
    assert r["parts"]["train"]["log_tail"] == "step 150 ..."


def test_throughput_part_reports_each_model_and_the_llama_goal(tmp_path, cache_dir):
    """The throughput part runs throughput.py per model on the given device (here CPU, one tiny model, one step)
    and reports its row and the goal against its speedup; a model that fails is an error row and the part fails."""
    args = gpu_checks.parser().parse_args([
        "throughput", "--device", "cpu", "--runs", "llama_tiny:64:1", "no_such_model:64:1", "--steps", "1",
        "--warmup", "1", "--threads", "1", "--goal", "llama_tiny", "--goal-speedup", "0.01", "--out", str(tmp_path)])
    report = gpu_checks.cmd_throughput(args)
    good, bad = report["rows"]
    assert good["model"] == "llama_tiny" and good["seqpar"]["step_s"] > 0 and good["transformers"]["step_s"] > 0
    assert report["goal"] == {"ok": True, "speedup": good["speedup"], "target": 0.01}
    assert bad["model"] == "no_such_model" and bad["error"] and not report["ok"]


def test_merge_bundles_the_records_but_no_checkpoints(tmp_path):
    """logs.tar.gz: results.json, every part's log and JSON, the runs' configs and metrics; no checkpoint, and no
    file over the size cap (listed instead)."""
    (tmp_path / "status.tsv").write_text("env\t0\t1\tpython env\n")
    (tmp_path / "env.json").write_text(json.dumps({"ok": True}))
    (tmp_path / "env.log").write_text("versions")
    run = tmp_path / "train" / "gpt2_small" / "bf16"
    (run / "checkpoints" / "step_00000100").mkdir(parents=True)
    (run / "checkpoints" / "step_00000100" / "__0_0.distcp").write_bytes(b"\0" * 1000)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "config.yaml").write_text("model: gpt2_small\n")
    (tmp_path / "mfu").mkdir()
    (tmp_path / "mfu" / "trace.json").write_text("x" * (5 * 2**20))
    assert gpu_checks.main(["merge", str(tmp_path)]) == 0
    names = set(tarfile.open(tmp_path / "logs.tar.gz").getnames())
    assert names == {"status.tsv", "env.json", "env.log", "results.json", "train/gpt2_small/bf16/metrics.jsonl",
                     "train/gpt2_small/bf16/config.yaml"}
    bundle = gpu_checks.write_bundle(tmp_path)
    assert bundle["files"] == 6 and bundle["left_out_for_size"] == ["mfu/trace.json"]


def test_script_installs_from_a_wheel_folder_with_no_index(tmp_path):
    """With GPU_CHECKS_WHEELS (what gpu_wheels.sh fetches), gpu_checks.sh installs those wheels and seqpar from the
    checkout into their own folder with no index and no dependencies, and the parts import seqpar from there."""
    probe = tmp_path / "probe"
    (probe / "gpu_probe_pkg").mkdir(parents=True)
    (probe / "gpu_probe_pkg" / "__init__.py").write_text("VALUE = 7\n")
    (probe / "pyproject.toml").write_text('[project]\nname = "gpu-probe-pkg"\nversion = "1.0"\n')
    wheels, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "out"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                            "--no-build-isolation", "-w", str(wheels), str(probe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    env = {**os.environ, "GPU_CHECKS_WHEELS": str(wheels), "GPU_CHECKS_SITE": str(site), "GPU_CHECKS_PARTS": "env",
           "GPU_CHECKS_DEVICE": "cpu", "PYTHON": sys.executable, "PIP_NO_INDEX": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "bench" / "gpu_checks.sh"), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (site / "gpu_probe_pkg" / "__init__.py").is_file()
    assert json.loads((out / "env.json").read_text())["seqpar_from"] == str(site / "seqpar")
    assert (site / "seqpar" / "configs" / "config.yaml").is_file()
    assert {"results.json", "env.json"} <= set(tarfile.open(out / "logs.tar.gz").getnames())


def test_env_part_without_git(monkeypatch):
    """A copy of the checkout on a GPU machine may have no git: the env part records no commit and passes."""
    def no_git(cmd, *a, **k):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(gpu_checks.subprocess, "run", no_git)
    info = gpu_checks.cmd_env(gpu_checks.parser().parse_args(["env", "--device", "cpu"]))
    assert info["ok"] and info["commit"] is None and (Path(info["seqpar_from"]) / "torch_compat.py").is_file()
