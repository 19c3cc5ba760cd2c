"""Every config group composes and validates; every bad value gives its one `error:` line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from seqpar.cli import compose
from seqpar.config import Config
from seqpar.errors import UserError
from seqpar.trainer.loggers import wandb_mode
from seqpar.validation import validate

from ..conftest import CONFIG_DIR, ROOT, cli_env

MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def test_groups_are_complete():
    assert {"gpt_tiny", "gpt2_small", "gpt2_medium", "bert_tiny", "bert_base", "bert_large"} <= set(MODELS)
    assert {"builtin", "text_files", "hf_dataset"} <= set(DATA)
    assert {"bert_seq64k", "gpt_seq32k"} <= set(EXPERIMENTS)


def test_default_config():
    cfg = compose(CONFIG_DIR, [])
    assert isinstance(cfg, Config)
    assert (cfg.model.name, cfg.data.source) == ("gpt_tiny", "builtin")
    assert (cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.tp, cfg.parallel.sp) == (1, 1, 1, 1)
    validate(cfg)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes_and_validates(model):
    cfg = compose(CONFIG_DIR, [f"model={model}"])
    assert cfg.model.name == model
    validate(cfg)


def test_model_sizes():
    """The presets are the published architectures (parameter counts from our own model, on the meta device)."""
    from seqpar.models import build_model

    def count(name):
        m = build_model(compose(CONFIG_DIR, [f"model={name}"]).model, device="meta")
        return sum(p.numel() for p in m.parameters())

    assert abs(count("gpt2_small") - 124.4e6) < 0.5e6
    assert abs(count("gpt2_medium") - 354.8e6) < 1e6
    assert abs(count("bert_base") - 109.5e6) < 1.5e6  # BertForMaskedLM without the pooler
    assert abs(count("bert_large") - 335.1e6) < 1.5e6


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose(CONFIG_DIR, [f"+experiment={experiment}"])
    validate(cfg)
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert cfg.parallel.sp > 1


def test_experiment_lengths():
    bert = compose(CONFIG_DIR, ["+experiment=bert_seq64k"])
    gpt = compose(CONFIG_DIR, ["+experiment=gpt_seq32k"])
    assert (bert.model.arch, bert.data.seq_len) == ("bert", 65536)
    assert (gpt.model.arch, gpt.data.seq_len) == ("gpt", 32768)


def test_data_sources_compose():
    validate(compose(CONFIG_DIR, ["data=text_files", "data.paths=[a.txt]"]))
    validate(compose(CONFIG_DIR, ["data=hf_dataset", "data.hf_name=wikitext"]))


# (overrides, the field the error must name)
BAD = [
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["trainer.lr=-0.1"], "trainer.lr"),
    (["trainer.global_batch_size=0"], "trainer.global_batch_size"),
    (["trainer.micro_batch_size=5"], "trainer.micro_batch_size"),
    (["trainer.precision=fp8"], "trainer.precision"),
    (["trainer.activation_checkpointing=sometimes"], "trainer.activation_checkpointing"),
    (["parallel.ulysses=2"], "parallel.ulysses"),
    (["parallel.sp=2", "parallel.sp_impl=hybrid"], "parallel.ulysses"),
    (["parallel.sp=6", "parallel.sp_impl=hybrid", "parallel.ulysses=4", "data.seq_len=96"], "parallel.ulysses"),
    (["trainer.tiled_mlp=true", "parallel.tp=2", "parallel.tp_shard_activations=true"], "trainer.tiled_mlp"),
    (["trainer.grad_clip=-1"], "trainer.grad_clip"),
    (["trainer.beta2=1.0"], "trainer.beta2"),
    (["trainer.log_every=0"], "trainer.log_every"),
    (["trainer.seed=-3"], "trainer.seed"),
    (["model.num_heads=3"], "model.hidden_size"),
    (["model.num_layers=0"], "model.num_layers"),
    (["model.dropout=1.5"], "model.dropout"),
    (["model.arch=t5"], "model.arch"),
    (["model.activation=relu"], "model.activation"),
    (["data.seq_len=100000"], "data.seq_len"),
    (["data.seq_len=2"], "data.seq_len"),
    (["data.val_fraction=0"], "data.val_fraction"),
    (["data.source=web"], "data.source"),
    (["data=text_files"], "data.paths"),
    (["data=hf_dataset"], "data.hf_name"),
    (["parallel.dp=0"], "parallel.dp"),
    (["parallel.sp_impl=flash"], "parallel.sp_impl"),
    (["parallel.pp_schedule=zb"], "parallel.pp_schedule"),
    (["parallel.sp=2", "model.attn_dropout=0.1"], "model.attn_dropout"),
    (["parallel.dp=3", "trainer.global_batch_size=16"], "trainer.global_batch_size"),
    (["parallel.sp=3"], "data.seq_len"),  # GPT: 128 tokens in 2*sp = 6 zigzag chunks
    (["model=bert_tiny", "parallel.sp=3"], "data.seq_len"),
    (["parallel.sp=8", "parallel.sp_impl=ulysses"], "parallel.sp"),  # 4 heads over 8 ranks
    (["parallel.tp=3"], "parallel.tp"),  # 4 heads
    (["parallel.tp=2", "parallel.pp=2", "parallel.tp_shard_activations=true"], "parallel.tp_shard_activations"),
    (["parallel.tp=2", "data.seq_len=127", "parallel.tp_shard_activations=true"], "parallel.tp_shard_activations"),
    (["trainer.engine=zero"], "trainer.engine"),
    (["trainer.zero_stage=2"], "trainer.zero_stage"),  # without trainer.engine=deepspeed
    (["trainer.engine=deepspeed", "parallel.dp=2", "trainer.zero_stage=4"], "trainer.zero_stage"),
    (["trainer.engine=deepspeed"], "trainer.engine"),  # one rank: nothing to shard
    (["trainer.offload_optimizer=true"], "trainer.offload_optimizer"),  # ZeRO-Offload without DeepSpeed
    (["trainer.engine=deepspeed", "parallel.dp=2", "parallel.tp=2"], "parallel.tp"),
    (["trainer.engine=deepspeed", "parallel.sp=2", "parallel.pp=2"], "parallel.pp"),
    (["parallel.tp=2", "model.vocab_size=4097"], "parallel.tp"),
    (["parallel.pp=5"], "parallel.pp"),  # 4 layers
    (["parallel.pp=3", "parallel.pp_schedule=interleaved_1f1b"], "parallel.pp"),  # 6 virtual stages
    (["parallel.pp=2", "parallel.microbatches=3"], "parallel.microbatches"),  # 16 sequences
    (["parallel.pp=4", "parallel.microbatches=2"], "parallel.microbatches"),  # fewer than stages
    (["parallel.pp=2", "trainer.micro_batch_size=2"], "trainer.micro_batch_size"),
    (["parallel.timeout_s=0"], "parallel.timeout_s"),
    (["logger.wandb.mode=cloud"], "logger.wandb.mode"),
    (["device=tpu"], "device"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_name_their_field(overrides, field):
    cfg = compose(CONFIG_DIR, overrides)
    with pytest.raises(UserError) as info:
        validate(cfg)
    assert info.value.field == field
    text = str(info.value)
    assert text.startswith(field + " ") and "; " in text and "\n" not in text


def test_layout_checks_of_the_engine_are_left_to_whoever_chooses_the_layout():
    """The planner and parallel=auto check each layout they consider: a DeepSpeed config passes `validate` without
    its layout (dp * sp = 1 by default) there, and is refused with it (what train.py runs)."""
    cfg = compose(CONFIG_DIR, ["trainer.engine=deepspeed", "trainer.zero_stage=3", "trainer.offload_optimizer=true"])
    validate(cfg, layout=False)
    with pytest.raises(UserError) as info:
        validate(cfg)
    assert info.value.field == "trainer.engine" and "dp * sp = 1" in str(info.value)


# Through the command line: one `error:` line on stderr, exit code 2, no traceback, nothing started.
# (A few kinds of failure end to end; tests/configs/test_bad_inputs.py holds the whole table through the same checks.)
CLI_BAD = [
    (["trainer.no_such_key=1"], "error: trainer.no_such_key is not a known setting"),
    (["parallel.pp=8"], "error: parallel.pp (8) needs 8 pipeline stages of at least one layer but model.num_layers is 4"),
    (["parallel.devices=2"], "error: parallel.devices is set without parallel=auto; add parallel=auto or drop parallel.devices"),
]


@pytest.mark.parametrize("args,expected", CLI_BAD, ids=[" ".join(a) for a, _ in CLI_BAD])
def test_cli_bad_input_gives_one_error_line(tmp_path, cache_dir, args, expected):
    env = cli_env(cache_dir)
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run directory


def test_wandb_mode_precedence(monkeypatch):
    cfg = Config()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(cfg) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(cfg) == "disabled"
    cfg = dataclasses.replace(cfg, logger=dataclasses.replace(cfg.logger, wandb=dataclasses.replace(cfg.logger.wandb, mode="online")))
    assert wandb_mode(cfg) == "online"
    assert os.environ["WANDB_MODE"] == "disabled"
