"""Every parallel layout through the command line, against the single-process run.

Same seed and global batch, 5 steps of the two-layer tiny models with hidden dropout 0.1 (its masks are drawn per
token, so they do not depend on the layout: `seqpar.models.dropout`): at every step the loss must agree to a relative 1e-5 and the gradient norm
to 1e-4 (fp32 on CPU), the final evaluation loss too, and the saved final weights to 1e-4: Adam moves every
weight by about the learning rate (1e-3) per step whatever its gradient's size, so a missing or doubled gradient
contribution shows at that scale, while float rounding in near-zero gradients stays around 1e-5.

Layouts are run as Hydra multiruns (`python train.py -m parallel.sp=2,4 parallel.sp_impl=ring,rsa,ulysses`): one
command line runs several jobs one after another, each starting its own processes, which keeps the suite fast.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from ..conftest import ROOT, cli_env, run_train
from .test_train_cli import read_metrics, train_ok

pytestmark = pytest.mark.slow

# Two layers of the tiny models (enough for a pipeline stage each at pp=2; the per-step cost of these runs is
# mostly per-operation overhead, so halving the layers saves about a third of the suite's parallel runs).
STEPS = ["trainer.max_steps=5", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1",
         "trainer.threads=1", "trainer.warmup_steps=2", "model.num_layers=2", "model.dropout=0.1"]
NO_CHECKPOINT = ["checkpoint.at_end=false"]  # checkpoints have their own tests; the 4D run still saves one
LOSS_RTOL, GRAD_ATOL, WEIGHT_ATOL = 1e-5, 1e-4, 1e-4
MODELS = ("gpt_tiny", "bert_tiny")

# Each entry is one multirun: (what it covers, sweep overrides). Micro-batches of 4 sequences everywhere (gradient
# accumulation, or the pipeline's micro-batches) against one batch of 16 in the reference.
SWEEPS = {
    "sp": ["parallel.sp=4", "parallel.sp_impl=ring,rsa,ulysses", "trainer.micro_batch_size=4"],  # sp=2: below
    "dp": ["parallel.dp=2", "trainer.micro_batch_size=4"],
    # two-level sp: all-to-all in 2 groups of 2 ranks, ring attention across the 2 groups
    "hybrid sp": ["parallel.sp=4", "parallel.sp_impl=hybrid", "parallel.ulysses=2", "trainer.micro_batch_size=4"],
    "dp x sp": ["parallel.dp=2", "parallel.sp=2", "parallel.sp_impl=ring,rsa,ulysses", "trainer.micro_batch_size=4"],
    # with MLPs run 48 tokens at a time (tiles of 48, 48 and 32 of 128)
    "tp, dp x tp": ["parallel.dp=1,2", "parallel.tp=2", "trainer.micro_batch_size=4", "trainer.tiled_mlp=48"],
    # rsa/ulysses under tp: the same hook; with activation checkpointing whose block inputs wait in host memory
    "tp x sp": ["parallel.tp=2", "parallel.sp=2", "trainer.micro_batch_size=4", "trainer.activation_checkpointing=offload"],
    # Megatron's activation sharding inside tp (LayerNorm/dropout regions hold T/tp tokens), under sp (alone: in
    # the dropout test below, for GPT).
    "tp activation sharding": ["parallel.tp=2", "parallel.tp_shard_activations=true", "parallel.sp=2",
                               "trainer.micro_batch_size=4"],
    # interleaved_1f1b holds 2 stages per rank: 4 layers (against a reference of 4 layers).
    "pp schedules": ["parallel.pp=2", "parallel.pp_schedule=gpipe,1f1b,interleaved_1f1b", "parallel.microbatches=4",
                     "model.num_layers=4"],
    "pp x sp": ["parallel.pp=2", "parallel.sp=2", "parallel.sp_impl=ring,rsa", "parallel.microbatches=4"],
    "pp x tp (x sp)": ["parallel.pp=2", "parallel.tp=2", "parallel.sp=1,2", "parallel.microbatches=4"],
    "dp x pp x tp": ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2"],
}


# Llama (llama_tiny: 2 key/value heads for 4 query heads, an untied head) where it differs from GPT: each sp_impl with
# fewer key/value heads than query heads (ulysses at sp=4 repeats them to the ranks), tp sharding the key/value
# heads, pipeline stages without tied weights, and all three at once. All with document masking, Llama's default
# (data.document_mask: the built-in corpus puts about two documents in each 128-token window): document ids cut
# into sp chunks, ring skipping chunk pairs, passed to every pipeline stage and to tp's sharded heads.
LLAMA = "llama_tiny"
LLAMA_SWEEPS = {
    "sp": ["parallel.sp=4", "parallel.sp_impl=ring,rsa,ulysses", "trainer.micro_batch_size=4"],
    "hybrid sp": ["parallel.sp=4", "parallel.sp_impl=hybrid", "parallel.ulysses=2", "trainer.micro_batch_size=4"],
    "tp, tp x sp": ["parallel.tp=2", "parallel.sp=1,2", "trainer.micro_batch_size=4"],
    "pp": ["parallel.pp=2", "parallel.pp_schedule=gpipe,1f1b", "parallel.microbatches=4"],
    "dp x pp x tp": ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2"],
}
CASES = [(name, MODELS, overrides) for name, overrides in SWEEPS.items()] + [
    (f"{LLAMA} {name}", (LLAMA,), overrides) for name, overrides in LLAMA_SWEEPS.items()]


def merged(*groups: list[str]) -> list[str]:
    """Overrides, a later group's value replacing an earlier one's for the same key (Hydra refuses duplicates)."""
    out: dict[str, str] = {}
    for group in groups:
        for o in group:
            out[o.split("=", 1)[0]] = o
    return list(out.values())


def final_weights(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final_model" / "model.safetensors"))


def assert_same_run(got, want, label):
    (steps, evals, *weights), (ref_steps, ref_evals, *ref_weights) = got, want
    assert [r["step"] for r in steps] == [r["step"] for r in ref_steps] == [1, 2, 3, 4, 5], label
    for a, b in zip(steps, ref_steps, strict=True):
        assert abs(a["loss"] - b["loss"]) / b["loss"] < LOSS_RTOL, (label, a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < GRAD_ATOL, (label, a["step"], a["grad_norm"], b["grad_norm"])
        assert a["tokens"] == b["tokens"]
    assert abs(evals[-1]["eval_loss"] - ref_evals[-1]["eval_loss"]) / ref_evals[-1]["eval_loss"] < LOSS_RTOL, label
    if weights and ref_weights:
        assert weights[0].keys() == ref_weights[0].keys()
        for name, w in weights[0].items():
            diff = (w - ref_weights[0][name]).abs().max().item()
            assert diff < WEIGHT_ATOL, (label, name, diff)


def multirun(args, cache_dir, sweep_dir, weights=True) -> tuple[list[tuple[str, str, tuple]], str]:
    """Run `python train.py -m <args>`; (model, parallel overrides, metrics and final weights unless `weights` is
    false) for every job, and the command's stdout."""
    proc = run_train(["-m", *args, f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"],
                     cache_dir, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    out = []
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), None)
        label = " ".join(o for o in overrides if o.startswith("parallel."))
        out.append((model, label, (*read_metrics(job), *([final_weights(job)] if weights else []))))
    return out, proc.stdout


@pytest.mark.parametrize("sweep,models,overrides", CASES, ids=[c[0] for c in CASES])
def test_layouts_match_single_process(tmp_path, cache_dir, reference, sweep, models, overrides):
    """One multirun per family of layouts, over both models (GPT and BERT), and Llama's own families."""
    jobs, stdout = multirun([f"model={','.join(models)}", *merged(STEPS, overrides), *NO_CHECKPOINT], cache_dir,
                            tmp_path / "sweep")
    model_overrides = [o for o in overrides if o.startswith("model.")]
    expected = len(models)
    for arg in overrides:
        expected *= len(arg.split("=", 1)[1].split(","))
    assert len(jobs) == expected
    assert stdout.count("step 5 | loss") == expected  # progress from rank 0 only
    for model, label, run in jobs:
        assert_same_run(run, reference(model, *model_overrides), f"{model} {label}")


def test_full_4d_layout_matches_single_process(tmp_path, cache_dir, reference):
    """dp=2 x pp=2 x tp=2 x sp=2: 16 processes of bert_tiny, every parallelism at once."""
    run = tmp_path / "run"
    train_ok(["model=bert_tiny", "parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "parallel.sp=2",
              "parallel.microbatches=2", *STEPS, f"hydra.run.dir={run}"], cache_dir, timeout=600)
    assert_same_run((*read_metrics(run), final_weights(run)), reference("bert_tiny"), "4D")
    assert (run / "checkpoints" / "step_00000005" / "meta.json").is_file()  # saved by 16 ranks


@pytest.mark.parametrize("experiment,sp", [("bert_seq64k", 8), ("gpt_seq32k", 4)])
def test_experiment_layouts_run_at_debug_size(tmp_path, cache_dir, experiment, sp):
    """The cluster experiments keep their layout (sp=8 ring for BERT, sp=4 for GPT), activation checkpointing and
    micro-batching under `+debug=tiny`, and match the same run on one process (with their hidden dropout, 0.1)."""
    jobs, _ = multirun([f"+experiment={experiment}", "+debug=tiny", f"parallel.sp={sp},1",
                        *NO_CHECKPOINT], cache_dir, tmp_path / "sweep")
    (_, parallel_label, parallel), (_, _, single) = jobs
    assert parallel_label == f"parallel.sp={sp}"
    assert_same_run(parallel, single, experiment)


def test_torchrun_joins_instead_of_starting_processes(tmp_path, cache_dir, reference):
    """Under torchrun every process is one rank (RANK/WORLD_SIZE), and the run equals the single-process one."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ROOT / "train.py"),
         "model=gpt_tiny", "parallel.sp=2", *STEPS, *NO_CHECKPOINT, f"hydra.run.dir={run}"],
        cwd=ROOT, env={**cli_env(cache_dir), "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_run((*read_metrics(run), final_weights(run)), reference("gpt_tiny"), "torchrun sp=2")


def test_tensor_parallel_dropout_agrees_with_one_process(tmp_path, cache_dir):
    """Dropout under tp=2 with activation sharding reproduces the single-process run exactly: hidden dropout on
    each rank's token shard draws its tokens' masks, and attention dropout on each rank's heads uses its slice of
    the mask one process draws (the ranks share one RNG stream), so the masks differ between ranks where their
    data do."""
    jobs, _ = multirun(["model=gpt_tiny", "model.attn_dropout=0.1", "parallel.tp=1,2",
                        "parallel.tp_shard_activations=true", *STEPS, *NO_CHECKPOINT], cache_dir, tmp_path / "sweep")
    (_, _, single), (_, _, tp2) = jobs
    assert_same_run(tp2, single, "dropout tp=2")


def test_linformer_under_sequence_parallelism_matches_one_process(tmp_path, cache_dir):
    """model.attention=linformer (BERT): each sp rank projects its chunk's keys and values with its columns of the
    projections and one all-reduce sums them; sp=2 and 4 equal the single-process Linformer run."""
    jobs, stdout = multirun(["model=bert_tiny", "model.attention=linformer", "model.linformer_k=16", "parallel.sp=1,2,4",
                        "trainer.micro_batch_size=4", *STEPS, *NO_CHECKPOINT], cache_dir, tmp_path / "sweep",
                       weights=False)  # transformers has no Linformer: no final_model
    (_, _, single), *parallel = jobs
    assert "final_model not written: transformers has no BERT with linformer attention" in stdout
    for _, label, run in parallel:
        assert_same_run(run, single, f"linformer {label}")


@pytest.mark.parametrize("model", ["gpt_tiny", LLAMA])
def test_auto_layout_is_announced_and_matches_single_process(tmp_path, cache_dir, reference, model):
    """parallel=auto on 2 devices: the planner's choice is printed before training and the run it starts equals the
    single-process run like any hand-set layout (Llama: with its grouped-query attention and document masks)."""
    run = tmp_path / "run"
    proc = train_ok([f"model={model}", "parallel=auto", "parallel.devices=2", *STEPS, *NO_CHECKPOINT,
                     f"hydra.run.dir={run}"], cache_dir)
    first = proc.stdout.splitlines()[0]
    assert first.startswith("parallel=auto: dp=") and "on 2 cpu devices: estimated" in first, first
    assert_same_run((*read_metrics(run), final_weights(run)), reference(model), f"{model} parallel=auto")
