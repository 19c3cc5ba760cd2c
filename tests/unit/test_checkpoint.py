"""Checkpoints in one process: what a resume restores and where, what export reads, and what it refuses.

The runs here are gpt_tiny with a batch of 4 sequences, trained in this process (a second or two per step)."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from seqpar.cli import compose
from seqpar.parallel.mesh import ParallelMesh
from seqpar.preflight import prepare
from seqpar.trainer.checkpoint import find_resume, manager, read_meta, verify_files
from seqpar.trainer.checkpoint.compat import check_same_sequences, sequences_record
from seqpar.trainer.checkpoint.paths import complete_checkpoints
from seqpar.trainer.checkpoint.state import OptimizerState
from seqpar.trainer.engine import DEEPSPEED_DIR, DEEPSPEED_TAG
from seqpar.trainer.loop import Trainer

from ..conftest import CONFIG_DIR

FAST = ["trainer.threads=1", "trainer.eval_batches=1", "trainer.eval_every=0", "trainer.log_every=1",
        "trainer.save_final=false", "logger.wandb.mode=disabled", "trainer.global_batch_size=4"]


def make_trainer(run: Path, *overrides: str) -> Trainer:
    """A trainer as a job builds it: the preflight finds the checkpoint to resume from (the newest in `run` under
    checkpoint.resume=auto), the trainer loads it."""
    cfg = compose(CONFIG_DIR, [*FAST, *overrides])
    cfg.run_dir = str(run)
    job = prepare(cfg)
    return Trainer(job.cfg, ParallelMesh.from_config(job.cfg.parallel, torch.device("cpu")), resume=job.resume)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, cache_dir) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("saved")
    make_trainer(run, "trainer.max_steps=2", "checkpoint.every=1").fit()
    return run


def copy_run(saved: Path, dst: Path) -> Path:
    shutil.copytree(saved, dst)
    return dst


class WritesFile:
    """Unpickling this calls `open(target, "w")`: the code a crafted checkpoint file would run."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


# --- the optimizer's state goes where torch keeps it ------------------------------------------------------------

def test_loaded_adam_step_lives_where_fused_and_capturable_kernels_need_it():
    """Fused and capturable AdamW keep `step` on the parameter's device (a CPU step fails the fused CUDA kernel).
    The checkpoint's tensors arrive on the CPU; on the meta device (no GPU needed) they must end up beside the
    parameters, as `Optimizer.load_state_dict` puts them."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to("meta")
    opt = torch.optim.AdamW(model.parameters(), capturable=True)
    loaded = {f"{name}.{key}": (torch.tensor(5.0) if key == "step" else torch.full(p.shape, 0.5))
              for name, p in model.named_parameters() for key in ("exp_avg", "exp_avg_sq", "step")}
    OptimizerState(opt, model).load_state_dict(loaded)
    for p in model.parameters():
        state = opt.state[p]
        assert {k: v.device.type for k, v in state.items()} == {"exp_avg": "meta", "exp_avg_sq": "meta", "step": "meta"}
        assert state["step"].dtype == torch.float32


def test_loaded_adam_state_equals_the_saved_one(saved, tmp_path):
    run = copy_run(saved, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    resumed = make_trainer(run, "trainer.max_steps=2")
    assert resumed.step == 1
    reference = make_trainer(tmp_path / "ref", "trainer.max_steps=1", "checkpoint.at_end=false")
    reference.fit()
    for p, q in zip(resumed.model.parameters(), reference.model.parameters(), strict=True):
        got, want = resumed.optimizer.state[p], reference.optimizer.state[q]
        assert all(torch.equal(got[k], want[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


# --- export reads nothing it should not --------------------------------------------------------------------------

def _plant_deepspeed_files(ckpt: Path, target: Path) -> list[str]:
    """Pickles where DeepSpeed's loader looks (model states and ZeRO optimizer partitions)."""
    folder = ckpt / DEEPSPEED_DIR / DEEPSPEED_TAG
    folder.mkdir(parents=True)
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    for name in names:
        torch.save({"optimizer_state_dict": WritesFile(target), "module": WritesFile(target)}, folder / name)
    return [str((folder / n).relative_to(ckpt)) for n in names]


def test_export_of_a_seqpar_checkpoint_ignores_a_planted_deepspeed_folder(saved, tmp_path):
    """meta.json says which engine wrote a checkpoint; a `deepspeed/` folder dropped into ours is never read."""
    from seqpar.export import export

    ckpt = shutil.copytree(saved / "checkpoints" / "step_00000002", tmp_path / "ckpt")
    _plant_deepspeed_files(ckpt, tmp_path / "pwned")
    out = export(ckpt, tmp_path / "out")
    assert (out / "model.safetensors").is_file()
    assert not (tmp_path / "pwned").exists()


def test_a_crafted_deepspeed_file_is_refused_with_an_error_line(saved, tmp_path, capsys):
    """A checkpoint whose meta.json names DeepSpeed (sizes and checksums forged to match) is read weights-only:
    the pickle's code never runs, export says what the file holds and exits 2."""
    pytest.importorskip("deepspeed")
    from seqpar.export import main

    ckpt = shutil.copytree(saved / "checkpoints" / "step_00000002", tmp_path / "ckpt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["engine"] = {"name": "deepspeed", "zero_stage": 1}
    for name in _plant_deepspeed_files(ckpt, tmp_path / "pwned"):
        data = (ckpt / name).read_bytes()
        meta["files"][name] = [len(data), zlib.crc32(data)]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as info:
        main([str(ckpt), str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    opener = f"{open.__module__}.{open.__qualname__}"  # what the pickle names: io.open, or _io.open on Python 3.12
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint ({ckpt}) has a DeepSpeed file holding an object "
                                               f"seqpar does not unpickle ({opener}): crafted"), err
    assert "; use only checkpoints written by seqpar" in err[0]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_deepspeed_loads_in_a_resume_are_weights_only(tmp_path):
    """DeepSpeed's own loader asks torch.load for weights_only=False; inside `weights_only_loads` it gets True."""
    pytest.importorskip("deepspeed")
    import pickle

    from seqpar.trainer.engine import weights_only_loads

    torch.save({"x": WritesFile(tmp_path / "pwned")}, tmp_path / "crafted.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with weights_only_loads():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "crafted.pt", weights_only=False)
        assert torch.equal(torch.load(tmp_path / "plain.pt", weights_only=False)["w"], torch.ones(2))
    assert not (tmp_path / "pwned").exists()
    assert torch.load.__module__ == "torch.serialization"  # restored


def test_export_checks_every_files_checksum(saved, tmp_path, capsys):
    from seqpar.export import main

    ckpt = shutil.copytree(saved / "checkpoints" / "step_00000002", tmp_path / "ckpt")
    f = ckpt / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as info:
        main([str(ckpt), str(tmp_path / "out")])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: checkpoint ({ckpt}) file __0_0.distcp does not match its recorded checksum: the checkpoint is "
        "corrupted; export another checkpoint of the run (a step_* directory)"]
    assert not (tmp_path / "out").exists()


# --- a failed save -----------------------------------------------------------------------------------------------

def test_a_failed_periodic_save_warns_and_training_goes_on_but_a_failed_last_save_ends_the_run(
        tmp_path, cache_dir, monkeypatch, capsys):
    import errno

    from seqpar.trainer.loop import TrainingAborted

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manager, "_write_meta", disk_full)
    trainer = make_trainer(tmp_path, "trainer.max_steps=2", "checkpoint.every=1")
    root = tmp_path / "checkpoints"
    with pytest.raises(TrainingAborted) as info:
        trainer.fit()
    assert trainer.step == 2  # step 1's save failed, step 2 was trained
    err = capsys.readouterr().err
    assert (f"warning: checkpoint.dir ({root}) could not take the checkpoint of step 1 (OSError: [Errno 28] No space "
            "left on device); training goes on and tries again at the next checkpoint") in err
    assert str(info.value) == (
        f"checkpoint.dir ({root}) could not take the checkpoint of step 2 (OSError: [Errno 28] No space left on "
        "device); free space or point checkpoint.dir at writable storage, then run the same command again: it "
        "resumes from the newest checkpoint")
    assert info.value.exit_code == 3
    assert list(root.iterdir()) == []  # the partial checkpoints were removed, nothing was published
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


# --- damaged checkpoints under auto-resume, and roll-backs --------------------------------------------------------

def _digest(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): zlib.crc32(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def _truncate(ckpt: Path) -> None:
    f = ckpt / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_a_byte(ckpt: Path) -> None:
    f = ckpt / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,why", [
    (_truncate, "file __0_0.distcp has"),  # found by the entry point's size check
    (_flip_a_byte, "file __0_0.distcp does not match its recorded checksum"),  # found by the ranks' CRC check
], ids=["truncated", "changed in place"])
def test_auto_resume_passes_over_a_damaged_newest_checkpoint(saved, tmp_path, capsys, damage, why):
    """A requeued job must not need a person: resume=auto continues from the newest checkpoint that passes its
    checks, says which it passed over and why, and keeps the damaged one (moved aside, byte for byte). A
    half-written last line of metrics.jsonl (the job was killed mid-write) is dropped, not a reason to stop."""
    run = copy_run(saved, tmp_path / "run")
    root, newest = run / "checkpoints", run / "checkpoints" / "step_00000002"
    damage(newest)
    kept = _digest(newest)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 7.9')
    cfg = compose(CONFIG_DIR, [*FAST, "trainer.max_steps=2", "checkpoint.every=1"])
    cfg.run_dir = str(run)
    prepare(cfg)  # the entry point does not refuse the run
    trainer = make_trainer(run, "trainer.max_steps=2", "checkpoint.every=1")
    assert trainer.resumed_from == root / "step_00000001" and trainer.step == 1
    err = capsys.readouterr().err
    assert f"warning: checkpoint.resume=auto passes over {newest} ({why}" in err
    assert "resuming from step_00000001 instead" in err
    assert f"moved step_00000002 into {root / 'superseded'}" in err
    assert _digest(root / "superseded" / "step_00000002") == kept
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 1
    trainer.fit()  # step 2 again, saved as a new checkpoint where the damaged one was
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000001", "step_00000002"]
    verify_files(newest, read_meta(newest))


def test_auto_resume_refuses_when_every_checkpoint_is_damaged(saved, tmp_path):
    from seqpar.errors import UserError

    run = copy_run(saved, tmp_path / "run")
    for step in (1, 2):
        _truncate(run / "checkpoints" / f"step_0000000{step}")
    cfg = compose(CONFIG_DIR, [*FAST, "trainer.max_steps=2"])
    cfg.run_dir = str(run)
    with pytest.raises(UserError, match=r"^checkpoint.resume is auto but no checkpoint in .* passes its checks "
                                          r"\(the newest, step_00000002: file __0_0.distcp has .*; move the damaged"):
        prepare(cfg)


def test_an_explicit_damaged_checkpoint_is_still_refused(saved, tmp_path):
    from seqpar.errors import UserError

    run = copy_run(saved, tmp_path / "run")
    _flip_a_byte(run / "checkpoints" / "step_00000002")
    with pytest.raises(UserError, match="does not match its recorded checksum"):
        make_trainer(run, "trainer.max_steps=2", f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}")


def test_rolling_back_moves_the_newer_checkpoints_aside(saved, tmp_path, capsys):
    """Resuming from step 1 of a run that has step 2: step 2 would otherwise block the new step 2 (a save keeps an
    existing step) and be what a later auto-resume picks. It is moved to superseded/, never deleted; a second
    roll-back keeps both old step-2 checkpoints."""
    run = copy_run(saved, tmp_path / "run")
    root = run / "checkpoints"
    first = _digest(root / "step_00000002")
    back = f"checkpoint.resume={root / 'step_00000001'}"
    trainer = make_trainer(run, "trainer.max_steps=2", "checkpoint.every=1", "trainer.lr=5e-4", back)
    assert trainer.step == 1 and not (root / "step_00000002").exists()
    assert f"moved step_00000002 into {root / 'superseded'}" in capsys.readouterr().err
    trainer.fit()
    trainer.cfg.checkpoint.resume = "auto"
    assert find_resume(trainer.cfg).path == root / "step_00000002"  # the new history's (trained at lr 5e-4)
    assert _digest(root / "step_00000002") != first
    make_trainer(run, "trainer.max_steps=2", back)  # and back again
    assert sorted(p.name for p in (root / "superseded").iterdir()) == ["step_00000002", "step_00000002.1"]
    assert _digest(root / "superseded" / "step_00000002") == first


def test_trim_metrics_drops_the_steps_after_the_checkpoint_and_a_half_written_line(tmp_path):
    from seqpar.trainer.metrics import trim_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 8.0 - s}) for s in (1, 2, 3)] + [json.dumps({"step": 2, "eval_loss": 7.0})]
    path.write_text("\n".join(lines) + '\n{"step": 4, "lo')
    trim_metrics(path, 2)
    assert path.read_text() == "\n".join([lines[0], lines[1], lines[3]]) + "\n"


# --- the data a checkpoint's loader position belongs to ---------------------------------------------------------

@pytest.mark.parametrize("overrides,field,there,here", [
    (["data.seq_len=64"], "data.seq_len", "128", "64"),
    (["data.val_fraction=0.1"], "data.val_fraction", "0.02", "0.1"),
    (["data=text_files", "data.paths=[{text}]"], "data.source", "builtin", "text_files"),
], ids=["seq_len", "val_fraction", "source"])
def test_resume_refuses_other_data_settings(saved, tmp_path, overrides, field, there, here):
    """The saved position (epoch, batch) counts the sequences these settings make: another value is one error line
    naming the field and the fix, at the entry point."""
    from seqpar.errors import UserError

    (tmp_path / "book.txt").write_text("Some text for a corpus. " * 200)
    cfg = compose(CONFIG_DIR, [*FAST, *(o.format(text=tmp_path / "book.txt") for o in overrides)])
    cfg.run_dir = str(saved)
    ckpt = saved / "checkpoints" / "step_00000002"
    with pytest.raises(UserError) as info:
        prepare(cfg)
    assert str(info.value) == (f"checkpoint.resume ({ckpt}) was trained with {field}={there}, this run has "
                               f"{field}={here}; resume with {field}={there} (the saved data position counts the "
                               "sequences those settings make), or start fresh in a new hydra.run.dir")


def test_resume_refuses_another_tokenizer_or_changed_text(saved):
    """What the settings made is checked by the ranks once the data is built: the tokenizer's vocabulary and the
    number of training sequences."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from seqpar.errors import UserError

    ckpt = saved / "checkpoints" / "step_00000002"
    meta = read_meta(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    n = meta["data"]["train_sequences"]
    check_same_sequences(ckpt, meta, sequences_record(SimpleNamespace(tokenizer=tok, train=range(n))))  # the same
    with pytest.raises(UserError, match=rf"was trained on {n} training sequences, this run's data makes {n + 5}: "
                                          "the text changed; resume on the data"):
        check_same_sequences(ckpt, meta, sequences_record(SimpleNamespace(tokenizer=tok, train=range(n + 5))))
    tok.add_tokens(["<another-token>"])
    with pytest.raises(UserError, match=r"was trained with another tokenizer .*; resume with the checkpoint's "
                                          rf"tokenizer \(data.tokenizer={ckpt / 'tokenizer'}\)"):
        check_same_sequences(ckpt, meta, sequences_record(SimpleNamespace(tokenizer=tok, train=range(n))))


def test_the_trainer_checks_the_data_record_and_takes_an_older_checkpoint_without_one(saved, tmp_path):
    from seqpar.errors import UserError

    run = copy_run(saved, tmp_path / "run")
    meta_file = run / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["data"]["train_sequences"] += 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="training sequences"):
        make_trainer(run, "trainer.max_steps=3")
    del meta["data"]  # as written before meta.json recorded the data
    meta_file.write_text(json.dumps(meta))
    assert make_trainer(run, "trainer.max_steps=3").step == 2
