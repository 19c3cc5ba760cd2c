"""End-to-end runs of `python train.py` through the command line, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ..conftest import run_train

pytestmark = pytest.mark.slow

FIELDS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_mib"}
SECRET = "local-5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7"  # a made-up wandb API key in the environment
FAST = ["trainer.threads=1", "trainer.log_every=1", "trainer.eval_batches=1"]


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval_loss" in r]


def assert_transformers_logits_match(hf_dir: Path, ours_dir: Path) -> None:
    """transformers' model (and tokenizer) from `hf_dir` predicts like our model loaded from `ours_dir`."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from seqpar.models.hf import from_pretrained

    ours, cfg = from_pretrained(ours_dir)
    auto = AutoModelForCausalLM if cfg.arch == "gpt" else AutoModelForMaskedLM
    hf = auto.from_pretrained(hf_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    enc = tok("Return a new list containing the items.", return_tensors="pt")
    with torch.no_grad():
        a = ours.eval()(enc["input_ids"], torch.arange(enc["input_ids"].shape[1]))
        b = hf(input_ids=enc["input_ids"]).logits
    assert (a - b).abs().max().item() < 1e-4


def train_ok(args, cache_dir, **kw):
    proc = run_train(args, cache_dir, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("model", ["gpt_tiny", "bert_tiny"])
def test_training_run_logs_metrics_and_loss_falls(tmp_path, cache_dir, model):
    run = tmp_path / "run"
    train_ok([f"model={model}", "trainer.max_steps=24", "trainer.eval_every=12", "trainer.warmup_steps=3",
              "trainer.log_every=6", "trainer.threads=1", f"hydra.run.dir={run}"], cache_dir)
    steps, evals = read_metrics(run)
    assert [r["step"] for r in steps] == [1, 6, 12, 18, 24]
    for r in steps:
        assert FIELDS <= r.keys()
        assert r["tokens"] == r["step"] * 16 * 128
        assert r["tokens_per_s"] > 0 and r["peak_mem_mib"] > 0 and r["grad_norm"] > 0
    assert [r["step"] for r in evals] == [12, 24]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.8, [r["loss"] for r in steps]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert (run / ".hydra" / "config.yaml").is_file()

    # The final weights are a transformers directory that loads and predicts like our model.
    assert_transformers_logits_match(run / "final_model", run / "final_model")


def test_bf16_activation_checkpointing_mfu_and_wandb_offline(tmp_path, cache_dir):
    """bf16 autocast with activation checkpointing on dp=2, MFU logged; the offline wandb run holds the run's name,
    group and layout tags, the metrics (memory per rank too) and wandb's system metrics, and no secret."""
    run = tmp_path / "run"
    train_ok(["model=gpt_tiny", "parallel.dp=2", "trainer.max_steps=3", "trainer.precision=bf16", "trainer.activation_checkpointing=true",
              "trainer.micro_batch_size=8", "trainer.eval_every=0", *FAST, "logger.wandb.mode=offline", "trainer.peak_flops=1e11",
              f"hydra.run.dir={run}"], cache_dir, env={"WANDB_API_KEY": SECRET})  # the explicit mode beats WANDB_MODE
    steps, evals = read_metrics(run)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and (run / "checkpoints").is_dir()
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]  # no secret in configs, logs or checkpoints
    # The run's records (protobuf in wandb's append-only log; a short run's strings are stored whole).
    (log,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data = log.read_bytes()
    for expected in (b"gpt_tiny-dp2", b"dp2", b"tp1", b"ring", b"loss", b"grad_norm", b"tokens_per_s", b"mfu",
                     b"peak_mem_mib/rank_1", b"memory_percent"):
        assert expected in data, expected
    assert len(steps) == 3 and len(evals) == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert all(0 < r["mfu"] < 1 for r in steps)  # reported once the device's peak FLOP/s is known
    assert list((run / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    assert (run / "final_model" / "model.safetensors").is_file()
