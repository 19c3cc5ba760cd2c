"""parallel=auto's memory settings: when no layout fits the config as given, it turns on, one after another and
cheapest first, activation checkpointing, tiled MLPs and (on CUDA only) offloaded checkpoints, never a setting the
config sets itself; the layouts it weighs are those `validate` accepts; and train.py runs the config it chose.

Every budget here is taken between two of the planner's own estimates (the smallest peak of any layout at one step
and at the next), so the tests follow the estimate rather than fixed numbers."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from seqpar.cli import compose
from seqpar.config import memory_settings
from seqpar.errors import UserError
from seqpar.plan import auto
from seqpar.plan.auto import choose_layout
from seqpar.plan.cli import main as plan_main
from seqpar.plan.estimate import plan
from seqpar.plan.memory import kept_settings, memory_steps
from seqpar.validation import validate

from ..conftest import CONFIG_DIR

pytestmark = pytest.mark.xdist_group("plan_auto")  # one worker: the CPU baseline is measured once

BERT = ["model=bert_base", "data.seq_len=8192", "model.max_seq_len=8192", "trainer.global_batch_size=8"]
AUTO = [*BERT, "parallel=auto", "parallel.devices=4"]
CKPT, TILED, OFFLOAD = ("trainer.activation_checkpointing=true", "trainer.tiled_mlp=true",
                        "trainer.activation_checkpointing=offload")


def smallest_gib(cfg, device: str) -> float:
    """The smallest estimated peak of any layout of 4 devices (GiB)."""
    return min(e.peak_mib for e in plan(cfg, 4, 80, device)) / 1024


@pytest.fixture(scope="module")
def steps() -> dict[str, list[float]]:
    """Per device type, the smallest peak at each step parallel=auto tries (as given, + checkpointing, + tiling,
    + offload on cuda): each step must lower it, or no budget could tell them apart."""
    cfg = compose(CONFIG_DIR, AUTO)
    out = {d: [smallest_gib(c, d) for _, c in memory_steps(cfg, d)] for d in ("cpu", "cuda")}
    assert len(out["cpu"]) == 3 and len(out["cuda"]) == 4
    for peaks in out.values():
        assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks), peaks
    return out


def between(peaks: list[float], step: int) -> float:
    """A budget that fits at `step` and not at the step before it."""
    return (peaks[step - 1] + peaks[step]) / 2


def on_cuda(monkeypatch, budget: float) -> None:
    """choose_layout as on a node of 4 GPUs of `budget` GiB (the estimate needs no GPU: the model is built on the
    meta device)."""
    monkeypatch.setattr(auto, "available_devices", lambda cfg: (4, budget, "cuda"))


def test_nothing_is_turned_on_when_the_config_fits_as_given(steps, capsys):
    chosen = choose_layout(compose(CONFIG_DIR, [*AUTO, f"parallel.device_mem_gib={steps['cpu'][0] + 1}"]))
    assert (chosen.trainer.activation_checkpointing, chosen.trainer.tiled_mlp) == (None, None)
    assert memory_settings(chosen.trainer).activation_checkpointing is False  # what the run then has
    assert "turned on" not in capsys.readouterr().out


@pytest.mark.parametrize("step, turned_on", [(1, [CKPT]), (2, [CKPT, TILED])], ids=["checkpointing", "tiling"])
def test_settings_are_turned_on_cheapest_first_until_a_layout_fits(steps, capsys, step, turned_on):
    cpu = steps["cpu"]
    budget = between(cpu, step)
    chosen = choose_layout(compose(CONFIG_DIR, [*AUTO, f"parallel.device_mem_gib={budget}"]))
    t = chosen.trainer
    assert t.activation_checkpointing is True
    assert t.tiled_mlp is (True if step == 2 else None)
    out = capsys.readouterr().out.strip()
    assert out.startswith("parallel=auto: dp=") and f"{' '.join(turned_on)} on 4 cpu devices: estimated" in out
    tried = "; ".join([f"as given, the smallest needs {cpu[0]:.2f} GiB",
                       f"{CKPT}, the smallest needs {cpu[1]:.2f} GiB"][:step])
    assert out.endswith(f"; turned on {' '.join(turned_on)} (cheapest first) since no layout fits with less ({tried})")


def test_offload_is_chosen_on_cuda_and_never_on_cpu(steps, monkeypatch, capsys):
    cuda = steps["cuda"]
    on_cuda(monkeypatch, between(cuda, 3))
    chosen = choose_layout(compose(CONFIG_DIR, AUTO))
    assert (chosen.trainer.activation_checkpointing, chosen.trainer.tiled_mlp) == ("offload", True)
    assert f"{OFFLOAD} {TILED} on 4 cuda devices" in capsys.readouterr().out
    # On a CPU the host memory is the device's: offload is not a step, and below tiling's peak nothing fits.
    cfg = compose(CONFIG_DIR, AUTO)
    assert all(c.trainer.activation_checkpointing != "offload" for _, c in memory_steps(cfg, "cpu"))
    monkeypatch.undo()
    budget = steps["cpu"][2] * 0.98
    with pytest.raises(UserError) as info:
        choose_layout(compose(CONFIG_DIR, [*AUTO, f"parallel.device_mem_gib={budget}"]))
    message = str(info.value)
    assert message.startswith(f"parallel.auto finds no layout of 4 devices that fits {budget:.1f} GiB per device "
                              f"(the smallest needs {steps['cpu'][2]:.2f} GiB (")
    assert f"), even with {CKPT} {TILED}; use more devices (parallel.devices), a smaller" in message
    assert "offload" not in message


def test_an_explicit_setting_is_never_changed(steps, monkeypatch):
    """trainer.activation_checkpointing=false on the command line: checkpointing would fit, so parallel=auto fails
    (it tried tiling alone) and says what the user may change; =true is not made offload on cuda either."""
    cpu = steps["cpu"]
    budget = between(cpu, 1)
    off = compose(CONFIG_DIR, [*AUTO, "trainer.activation_checkpointing=false", f"parallel.device_mem_gib={budget}"])
    tiled_alone = dataclasses.replace(off, trainer=dataclasses.replace(off.trainer, tiled_mlp=True))
    assert smallest_gib(tiled_alone, "cpu") > budget  # tiling alone does not take the place of checkpointing here
    with pytest.raises(UserError) as info:
        choose_layout(off)
    message = str(info.value)
    assert message.startswith("parallel.auto finds no layout of 4 devices that fits")
    assert (f", even with {TILED}, with trainer.activation_checkpointing=false as set; use more devices "
            f"(parallel.devices), {CKPT}, a smaller trainer.micro_batch_size or data.seq_len") in message

    on_cuda(monkeypatch, between(steps["cuda"], 3))  # only offload fits
    with pytest.raises(UserError) as info:
        choose_layout(compose(CONFIG_DIR, [*AUTO, CKPT]))
    assert f", even with {TILED}, with {CKPT} as set;" in str(info.value)


def test_a_setting_in_a_config_file_counts_as_set():
    cfg = compose(CONFIG_DIR, ["+experiment=gpt_seq32k"])  # its YAML sets activation_checkpointing: true
    assert kept_settings(cfg) == [CKPT]
    assert all(c.trainer.activation_checkpointing is True for _, c in memory_steps(cfg, "cuda"))


@pytest.mark.parametrize("overrides, excluded", [
    (["model=bert_tiny", "model.attention=linformer"], lambda p: p.tp > 1),
    (["model=gpt_tiny", "model.attn_dropout=0.1"], lambda p: p.sp > 1),
    (["model=gpt_tiny", "parallel.tp_shard_activations=true"], lambda p: p.tp > 1 and p.pp > 1),
    (["model=gpt_tiny", "parallel.tp_shard_activations=true", TILED], lambda p: p.tp > 1),
    # A pipeline splits the 16 sequences / dp into parallel.microbatches (4): only those of 2 keep the micro-batch.
    (["model=gpt_tiny", "trainer.micro_batch_size=2"], lambda p: p.pp > 1 and 16 // p.dp // 4 != 2),
], ids=["linformer-tp", "attn_dropout-sp", "tp_shard_activations-pp", "tiled-tp_shard_activations", "micro-pp"])
def test_the_layouts_weighed_are_those_validate_accepts(overrides, excluded):
    cfg = compose(CONFIG_DIR, [*overrides, "parallel=auto"])
    rows = plan(cfg, 8, 80)
    assert rows
    for e in rows:
        p = dataclasses.replace(cfg.parallel, dp=e.dp, pp=e.pp, tp=e.tp, sp=e.sp, auto=False)
        validate(dataclasses.replace(cfg, parallel=p))
        assert not excluded(p), e.layout


def test_the_planner_command_line_turns_settings_on_with_auto_memory(steps, capsys):
    budget = between(steps["cuda"], 2)
    plan_main([*BERT, "--gpus", "4", "--gpu-mem-gib", f"{budget}", "--auto-memory"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "activation checkpointing" in lines[0]
    assert lines[-1].startswith("best: parallel.dp=") and f" {CKPT} {TILED}  (" in lines[-1]
    assert "turned on" in lines[-1]
    with pytest.raises(SystemExit):  # without the flag: the config as given
        plan_main([*BERT, "--gpus", "4", "--gpu-mem-gib", f"{budget}"])


def test_train_py_runs_the_config_parallel_auto_chose(steps, monkeypatch, tmp_path, capsys):
    """The whole command line, as `python train.py` runs it, up to the launch: the job handed to the ranks has the
    layout and the settings of the line rank 0 printed, and the settings it left unset are off."""
    import seqpar.train as train

    launched = []
    monkeypatch.setattr(train, "launch_job", lambda job, built: launched.append(job))
    budget = between(steps["cpu"], 1)
    monkeypatch.setattr(sys, "argv", ["train.py", *AUTO, f"parallel.device_mem_gib={budget}",
                                      f"hydra.run.dir={tmp_path}"])
    train.main()
    (job,) = launched
    line = capsys.readouterr().out.strip().splitlines()[0]
    p, t = job.cfg.parallel, job.cfg.trainer
    assert line.startswith(f"parallel=auto: dp={p.dp} pp={p.pp} tp={p.tp} sp={p.sp} ")
    assert f" {CKPT} on 4 cpu devices" in line
    assert (t.activation_checkpointing, t.tiled_mlp) == (True, False) and not p.auto
