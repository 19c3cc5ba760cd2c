"""The trainer's guards: a non-finite loss skips its step (no update, counted and logged) and too many in a row
abort the run; a preemption signal saves a checkpoint and stops."""

from __future__ import annotations

import json
import math

import pytest
import torch

from seqpar.cli import compose
from seqpar.parallel.mesh import ParallelMesh
from seqpar.preflight import prepare
from seqpar.trainer.loop import Trainer, TrainingAborted

from ..conftest import CONFIG_DIR


def make_trainer(tmp_path, *overrides, nan_steps=()):
    cfg = compose(CONFIG_DIR, ["trainer.threads=1", "trainer.eval_batches=1", "trainer.eval_every=0",
                               "trainer.log_every=1", "trainer.save_final=false", "checkpoint.at_end=false",
                               "logger.wandb.mode=disabled", "trainer.global_batch_size=4", *overrides])
    cfg.run_dir = str(tmp_path)
    job = prepare(cfg)  # as the entry point does: init_from's architecture, the checks
    trainer = Trainer(job.cfg, ParallelMesh.from_config(cfg.parallel, torch.device("cpu")), resume=job.resume)
    forward = trainer.forward_loss

    def poisoned(micro):  # step numbers are 1-based: trainer.step is the count of steps done
        loss = forward(micro)
        return loss * float("nan") if trainer.step + 1 in nan_steps else loss

    trainer.forward_loss = poisoned
    return trainer


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path, "trainer.max_steps=4", nan_steps={2})
    trainer.train_step()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {p: trainer.optimizer.state[p]["exp_avg"].clone() for p in trainer.model.parameters()}
    loss, _ = trainer.train_step()
    assert math.isnan(loss) and trainer.skipped_steps == 1 and trainer.bad_steps == 1
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(trainer.optimizer.state[p]["exp_avg"], m) for p, m in moments.items())
    assert all(p.grad is None for p in trainer.model.parameters())  # the bad gradients are gone
    loss, _ = trainer.train_step()  # the next good step resets the run of bad ones and updates again
    assert math.isfinite(loss) and trainer.bad_steps == 0
    assert not all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())


def test_too_many_bad_steps_in_a_row_abort_with_a_message(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path, "trainer.max_steps=10", "trainer.max_bad_steps=2", nan_steps={3, 5, 6, 7})
    with pytest.raises(TrainingAborted, match=r"trainer.max_bad_steps: the loss or gradient norm was not finite for "
                                              r"2 steps in a row \(steps 5-6\); lower trainer.lr"):
        trainer.fit()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # step 6 raised before it was logged
    assert [r.get("skipped_steps", 0) for r in records] == [0, 0, 1, 1, 2]


def test_sigusr1_saves_a_checkpoint_and_stops_after_the_step(tmp_path, cache_dir):
    """SLURM's advance notice (`--signal=USR1@120`) arrives mid-step: the step finishes, a checkpoint is saved and
    fit returns (the process then exits 0); the same run resumes from it."""
    import os
    import signal

    trainer = make_trainer(tmp_path, "trainer.max_steps=5")
    step = trainer.train_step

    def signalled_step():
        out = step()
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    trainer.train_step = signalled_step
    trainer.fit()
    assert trainer.step == 2
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    assert json.loads((ckpt / "meta.json").read_text())["reason"] == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is removed again
    resumed = make_trainer(tmp_path, "trainer.max_steps=5")
    assert resumed.step == 2 and resumed.loader.state_dict() == trainer.loader.state_dict()


def test_init_from_starts_from_the_saved_weights(tmp_path, cache_dir):
    """`model.init_from=<transformers dir>`: the trainer's model holds exactly those weights at step 0."""
    from seqpar.config import ModelConfig
    from seqpar.models import build_model
    from seqpar.models.hf import save_pretrained

    torch.manual_seed(99)  # not the trainer's seed: the weights must come from the directory
    saved = build_model(ModelConfig())
    save_pretrained(saved, tmp_path / "weights")
    trainer = make_trainer(tmp_path / "run", f"model.init_from={tmp_path / 'weights'}", "trainer.max_steps=1")
    got = trainer.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.state_dict().items())


@pytest.mark.parametrize("model", ["gpt_tiny", "bert_tiny"])
def test_the_fused_loss_trains_as_the_logits_loss_does(tmp_path, cache_dir, model):
    """trainer.fused_loss (the default) against the output layer's logits and their loss: the same losses, gradient
    norms and weights after three steps (fp32), BERT's target-token head included."""
    runs = {}
    for fused in (True, False):
        trainer = make_trainer(tmp_path / str(fused), f"model={model}", "trainer.max_steps=3",
                               f"trainer.fused_loss={str(fused).lower()}")
        assert (trainer.output_loss is not None) == fused
        steps = [trainer.train_step() for _ in range(3)]
        runs[fused] = steps, {k: v.clone() for k, v in trainer.model.state_dict().items()}
    (fused_steps, fused_weights), (ref_steps, ref_weights) = runs[True], runs[False]
    flat = [v for step in fused_steps for v in step]
    assert flat == pytest.approx([v for step in ref_steps for v in step], rel=1e-5)
    # AdamW divides each element's gradient by its own magnitude, so an element whose gradient is near zero moves by
    # a fraction of lr (5e-5 to 1.5e-4 in these warm-up steps) that rounding in a different summation order (slabs
    # of tokens, the thread count) can change: 1e-5 holds those; a wrong gradient moves most elements by ~lr.
    for name, value in ref_weights.items():
        torch.testing.assert_close(fused_weights[name], value, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_covers_the_fused_loss_and_ends_with_each_step(tmp_path, cache_dir, monkeypatch):
    """trainer.precision=bf16: the fused output layer's matmuls run in bf16, as the model's do, and autocast is off
    again after a training step and after an evaluation (which enters it around the loss and again around the
    model), so the optimizer, the next step's loss and what runs after fit are not left in bf16."""
    from seqpar.trainer import loss

    dtypes = []
    compute_dtype = loss._compute_dtype
    monkeypatch.setattr(loss, "_compute_dtype", lambda *a: dtypes.append(compute_dtype(*a)) or dtypes[-1])
    trainer = make_trainer(tmp_path, "model=gpt_tiny", "trainer.max_steps=2", "trainer.precision=bf16")
    trainer.train_step()
    assert not torch.is_autocast_enabled("cpu")
    assert trainer.evaluate() > 0 and not torch.is_autocast_enabled("cpu")
    trainer.train_step()
    assert not torch.is_autocast_enabled("cpu")
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_a_bf16_run_resumed_after_evaluations_continues_exactly(tmp_path, cache_dir):
    """bf16 with an evaluation every step and a checkpoint at step 2: the run resumed from it logs the same losses
    for steps 3 and 4 as the uninterrupted run (both had evaluated before those steps; before autocast got a fresh
    context at each use, the first evaluation left it on for the rest of the uninterrupted run only)."""
    args = ["model=gpt_tiny", "model.num_layers=1", "trainer.max_steps=4", "trainer.precision=bf16",
            "trainer.eval_every=1", "checkpoint.every=2"]

    def losses(run):
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    make_trainer(tmp_path / "ref", *args).fit()
    step2 = tmp_path / "ref" / "checkpoints" / "step_00000002"
    torch.set_autocast_enabled("cpu", False)  # as a resumed job's new process starts, whatever the run above left
    make_trainer(tmp_path / "resumed", *args, f"checkpoint.resume={step2}").fit()
    ref, resumed = losses(tmp_path / "ref"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4] and all(resumed[s] == ref[s] for s in (3, 4)), (ref, resumed)
