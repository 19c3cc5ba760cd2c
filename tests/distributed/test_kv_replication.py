"""Grouped-query attention with more tp ranks than key/value heads: each rank holds its query heads' key/value head,
replicated over the ranks that share it, and training matches one process.

One spawn of 4 gloo processes trains every layout below in turn (each its own mesh) with the real trainer: a
two-layer Llama with 4 query heads and 1 or 2 key/value heads, 3 optimizer steps of 8 sequences, 2 micro-batches
of 4 (or the pipeline's). Against the single process with the same seed and batch: each step's loss to a relative
1e-5, its gradient norm to 1e-4 and the weights after the steps to 1e-4 (fp32 on CPU; AdamW moves every weight by
about the learning rate per step, so a copy of a key/value head whose gradient missed the other copies' share, or
counted it twice, is off by that much). The tp=4 run with 2 key/value heads saves a checkpoint after step 2, which
one process resumes for step 3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seqpar.cli import compose
from seqpar.data.build import build_data
from seqpar.parallel.mesh import ParallelMesh
from seqpar.preflight import prepare
from seqpar.trainer.loop import Trainer

from ..conftest import CONFIG_DIR
from .spawn import spawn

LOSS_RTOL, GRAD_ATOL, WEIGHT_ATOL = 1e-5, 1e-4, 1e-4
STEPS = 3
RUN = ["model=llama_tiny", "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
       "data.seq_len=32", "trainer.global_batch_size=8", "trainer.micro_batch_size=4", f"trainer.max_steps={STEPS}",
       "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.warmup_steps=1",
       "trainer.threads=1", "trainer.save_final=false", "checkpoint.at_end=false", "logger.wandb.mode=disabled"]
MODELS = {"kv1_bias": ["model.num_kv_heads=1", "model.qkv_bias=true"], "kv2": ["model.num_kv_heads=2"]}
# (name, model, layout): every layout has 4 ranks; all but "kv2 dp2 x tp2" replicate key/value heads.
LAYOUTS = [
    ("kv1_bias tp4", "kv1_bias", ["parallel.tp=4"]),
    ("kv1_bias dp2 x tp2", "kv1_bias", ["parallel.dp=2", "parallel.tp=2"]),
    ("kv1_bias tp2 x sp2 ring", "kv1_bias", ["parallel.tp=2", "parallel.sp=2", "parallel.sp_impl=ring"]),
    ("kv1_bias tp2 x sp2 ulysses", "kv1_bias", ["parallel.tp=2", "parallel.sp=2", "parallel.sp_impl=ulysses"]),
    # Megatron's activation sharding: the attention's input all-gathered from token shards before q/k/v
    ("kv1_bias tp4 activation sharding", "kv1_bias", ["parallel.tp=4", "parallel.tp_shard_activations=true"]),
    ("kv1_bias pp2 x tp2", "kv1_bias", ["parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2"]),
    ("kv2 tp4", "kv2", ["parallel.tp=4", "checkpoint.every=2"]),
    ("kv2 dp2 x tp2", "kv2", ["parallel.dp=2", "parallel.tp=2"]),
]
SAVED = "kv2 tp4"  # its step-2 checkpoint is resumed on one process
pytestmark = pytest.mark.xdist_group("kv_replication")  # one worker trains the runs once


def _config(run_dir: Path, model: str, layout: list[str]):
    cfg = compose(CONFIG_DIR, [*RUN, *MODELS[model], *layout])
    cfg.run_dir = str(run_dir)
    return cfg


def _train(cfg, mesh: ParallelMesh, data, resume=None) -> None:
    """Train, then keep the metrics (rank 0 writes metrics.jsonl) and the whole weights (weights.pt)."""
    trainer = Trainer(cfg, mesh, data, resume=resume)
    trainer.fit()
    model = trainer.single_device_model()  # every rank takes part
    if mesh.is_logging_rank:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(cfg.run_dir) / "weights.pt")


def _run(run_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], torch.load(run_dir / "weights.pt")


def _train_layouts(rank: int, world: int, root: Path, data) -> None:
    for name, model, layout in LAYOUTS:
        cfg = _config(root / name, model, layout)
        _train(cfg, ParallelMesh.from_config(cfg.parallel, torch.device("cpu")), data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> dict[str, tuple[list[dict], dict]]:
    """Every layout's run and the single-process reference of each model (`ref <model>`), trained once."""
    root = tmp_path_factory.mktemp("kv_replication")
    data = build_data(_config(root / "ref", "kv2", []))  # the same sequences for every model and layout
    for model in MODELS:
        cfg = _config(root / f"ref {model}", model, [])
        _train(cfg, ParallelMesh.from_config(cfg.parallel, torch.device("cpu")), data)
    spawn(_train_layouts, 4, root, data, timeout=240)
    resumed = _config(root / "resumed", "kv2", [f"checkpoint.resume={root / SAVED / 'checkpoints' / 'step_00000002'}"])
    job = prepare(resumed)
    _train(job.cfg, ParallelMesh.from_config(job.cfg.parallel, torch.device("cpu")), data, resume=job.resume)
    return {path.name: _run(path) for path in root.iterdir() if (path / "weights.pt").is_file()}


def _assert_same_steps(got: list[dict], want: list[dict], label: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], label
    for a, b in zip(got, want, strict=True):
        assert abs(a["loss"] - b["loss"]) / b["loss"] < LOSS_RTOL, (label, a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < GRAD_ATOL, (label, a["step"], a["grad_norm"], b["grad_norm"])


def _assert_same_weights(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys(), label
    for name, w in got.items():
        diff = (w - want[name]).abs().max().item()
        assert diff < WEIGHT_ATOL, (label, name, diff)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,model", [(name, model) for name, model, _ in LAYOUTS], ids=[n for n, _, _ in LAYOUTS])
def test_layout_trains_like_one_process(runs, name, model):
    (steps, weights), (ref_steps, ref_weights) = runs[name], runs[f"ref {model}"]
    assert [r["step"] for r in ref_steps] == list(range(1, STEPS + 1))
    _assert_same_steps(steps, ref_steps, name)
    _assert_same_weights(weights, ref_weights, name)
    assert weights["layers.0.attn.k_proj.weight"].shape == (8 * int(model[2]), 32)  # the model's heads, once


@pytest.mark.timeout(300)
def test_checkpoint_of_replicated_heads_resumes_on_one_process(runs):
    """Saved at tp=4 with 2 key/value heads (each replicated on 2 ranks) after step 2; one process continues."""
    (steps, weights), (uninterrupted, final) = runs["resumed"], runs[SAVED]
    assert [r["step"] for r in steps] == [3]
    _assert_same_steps(steps, uninterrupted[2:], "resumed at tp=1")
    _assert_same_weights(weights, final, "resumed at tp=1")
