"""`python -m seqpar.prepare` then `python train.py data=prepared data.path=DIR`, as a user runs them."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from ..conftest import ROOT, cli_env
from .test_train_cli import FAST, read_metrics, train_ok

pytestmark = pytest.mark.slow


def prepare(out: Path, cache_dir: Path, *overrides: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "seqpar.prepare", "--out", str(out), "data.num_proc=1", *overrides],
                          cwd=ROOT, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("model", ["gpt_tiny", "bert_tiny"])
def test_training_reads_prepared_data_with_sequence_parallelism(tmp_path, cache_dir, model):
    data = tmp_path / "data"
    prepare(data, cache_dir, f"model={model}")
    run = tmp_path / "run"
    train_ok([f"model={model}", "data=prepared", f"data.path={data}", "parallel.sp=2", "trainer.max_steps=3",
              "trainer.eval_every=0", "trainer.save_final=false", *FAST, f"hydra.run.dir={run}"], cache_dir)
    steps, evals = read_metrics(run)
    assert [r["step"] for r in steps] == [1, 2, 3] and len(evals) == 1
    assert all(math.isfinite(r["loss"]) for r in steps) and math.isfinite(evals[0]["eval_loss"])
    assert not list((cache_dir / "prepared").glob(f"*{data.name}*"))  # read in place, nothing prepared again


def test_resuming_on_another_prepared_dataset_is_refused(tmp_path, cache_dir):
    first, second = tmp_path / "first", tmp_path / "second"
    prepare(first, cache_dir, "model=gpt_tiny")
    prepare(second, cache_dir, "model=gpt_tiny", "data.val_fraction=0.05")  # other documents in training
    run = tmp_path / "run"
    common = ["model=gpt_tiny", "data=prepared", "trainer.eval_every=0", "trainer.save_final=false", *FAST,
              f"hydra.run.dir={run}"]
    train_ok([*common, f"data.path={first}", "trainer.max_steps=2"], cache_dir)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, f"data.path={second}", "trainer.max_steps=3"],
                          cwd=ROOT, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1].startswith("error: checkpoint.resume") and "was trained" in lines[-1], lines[-1]


def test_blended_sources_log_tokens_per_source(tmp_path, cache_dir):
    """data.sources: a 3:1 blend of the built-in corpus and some standard-library sources (one tokenizer)."""
    docs, text = tmp_path / "docs", tmp_path / "text"
    prepare(docs, cache_dir, "model=gpt_tiny")
    (tmp_path / "src").mkdir()
    for name in ("textwrap.py", "string.py", "shlex.py", "calendar.py", "argparse.py", "inspect.py"):
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, tmp_path / "src" / name)
    prepare(text, cache_dir, "model=gpt_tiny", "data=text_files", f"data.paths=[{tmp_path / 'src'}/*.py]",
            f"data.tokenizer={docs / 'tokenizer'}")
    run = tmp_path / "run"
    train_ok(["model=gpt_tiny", "data=prepared", f"data.sources=[{{path: {docs}, weight: 3}}, {{path: {text}, weight: 1}}]",
              "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_final=false", *FAST, f"hydra.run.dir={run}"],
             cache_dir)
    steps, _ = read_metrics(run)
    assert [(r["tokens/docs"], r["tokens/text"]) for r in steps] == [(12 * 128, 4 * 128), (24 * 128, 8 * 128)]


def test_streaming_a_local_dataset_on_two_data_ranks_resumes(tmp_path, cache_dir):
    """data=hf_dataset data.streaming=true: dp=2 ranks each read their shard; a run stopped after 2 steps and
    continued to 3 logs the loss an uninterrupted run logs at step 3."""
    import json

    hub = tmp_path / "hub"
    hub.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for shard, names in enumerate([("textwrap.py", "string.py", "argparse.py"), ("calendar.py", "inspect.py", "glob.py")]):
        paragraphs = [p for n in names for p in (stdlib / n).read_text().split("\n\n") if p.strip()]
        (hub / f"train-{shard}.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    common = ["model=gpt_tiny", "data=hf_dataset", f"data.hf_name={hub}", "data.streaming=true", "parallel.dp=2",
              "trainer.eval_every=0", "trainer.save_final=false", *FAST]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_ok([*common, "trainer.max_steps=3", f"hydra.run.dir={whole}"], cache_dir)
    train_ok([*common, "trainer.max_steps=2", f"hydra.run.dir={parts}"], cache_dir)
    resumed = train_ok([*common, "trainer.max_steps=3", f"hydra.run.dir={parts}"], cache_dir)
    assert "resumed from" in resumed.stdout
    meta = json.loads((parts / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert len(meta["loader"]["streaming"]["positions"]) == 2
    (a, *_), (b, *_) = read_metrics(whole)[0][2:], read_metrics(parts)[0][2:]
    assert a["step"] == b["step"] == 3 and abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
