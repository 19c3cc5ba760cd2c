"""The bad-input table: each case exits with code 2 and one `error:` line naming what is wrong and the fix, before
anything starts, and leaves every saved file as it was. docs/bad-input.md lists the same cases with their messages.

The cases run through `preflight`, the function `train.py` calls on its command line before Hydra starts (the
subprocess tests in test_configs.py show that path end to end); the one damage only a rank can see (a checkpoint
file whose bytes changed but not its size) runs as a real command line.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

from seqpar.preflight import preflight

from ..conftest import CONFIG_DIR, ROOT

FAST = ["trainer.threads=1", "trainer.eval_batches=1", "trainer.eval_every=0", "logger.wandb.mode=disabled"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, cache_dir) -> Path:
    """A finished 2-step gpt_tiny run with checkpoints at steps 1 and 2 (trained in this process)."""
    from seqpar.cli import compose
    from seqpar.parallel.mesh import ParallelMesh
    from seqpar.trainer.loop import Trainer

    run = tmp_path_factory.mktemp("saved")
    cfg = compose(CONFIG_DIR, ["trainer.max_steps=2", "checkpoint.every=1", "trainer.save_final=false", *FAST])
    cfg.run_dir = str(run)
    Trainer(cfg, ParallelMesh.from_config(cfg.parallel, __import__("torch").device("cpu"))).fit()
    return run


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _copy_checkpoint(saved: Path, tmp: Path) -> Path:
    dst = tmp / "ckpt"
    shutil.copytree(saved / "checkpoints" / "step_00000002", dst)
    return dst


class _Boom:
    def __reduce__(self):
        return (__import__("os").system, ("touch pwned",))


def _scenario(name: str, saved: Path, tmp: Path) -> list[str]:
    """Make the files a case needs under `tmp`; returns the case's extra overrides."""
    if name == "empty":
        (tmp / "empty.txt").write_text("")
        return ["data=text_files", f"data.paths=[{tmp / 'empty.txt'}]"]
    if name == "binary":
        (tmp / "blob.txt").write_bytes(b"text\x00\x01\x02" * 200)
        return ["data=text_files", f"data.paths=[{tmp / 'blob.txt'}]"]
    if name == "latin1":
        (tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50)
        return ["data=text_files", f"data.paths=[{tmp / 'latin1.txt'}]"]
    if name == "directory":
        return ["data=text_files", f"data.paths=[{tmp}]"]
    tokenizer = saved / "checkpoints" / "step_00000002" / "tokenizer"  # gpt_tiny's: 4096 tokens, GPT specials
    if name == "small_vocab":
        return [f"data.tokenizer={tokenizer}", "model.vocab_size=1024"]
    if name == "bert_with_gpt_tokenizer":
        return ["model=bert_tiny", f"data.tokenizer={tokenizer}"]
    if name == "tokenizer_not_loadable":
        (tmp / "tok").mkdir()
        (tmp / "tok" / "tokenizer.json").write_text("{not json")
        return [f"data.tokenizer={tmp / 'tok'}"]
    ckpt = _copy_checkpoint(saved, tmp)
    if name == "truncated":
        f = ckpt / "__0_0.distcp"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif name == "half_written":
        (ckpt / "meta.json").unlink()
    elif name == "meta_garbage":
        (ckpt / "meta.json").write_text("{\"step\": 2, \"files\": ")
    elif name == "pickled_code":
        _replace_index(ckpt, pickle.dumps(_Boom()))
    elif name == "bytes_entry":  # DCP would torch.load a BYTE_IO entry without weights_only
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        from seqpar.trainer.checkpoint.files import MetadataUnpickler

        index = MetadataUnpickler(open(ckpt / ".metadata", "rb")).load()
        index.state_dict_metadata["model.wte.weight"] = BytesStorageMetadata()
        _replace_index(ckpt, pickle.dumps(index))
    return [f"checkpoint.resume={ckpt}"]


def _replace_index(ckpt: Path, data: bytes) -> None:
    """Swap DCP's .metadata, with its recorded size updated (so only the content check can catch it)."""
    (ckpt / ".metadata").write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][".metadata"][0] = len(data)
    (ckpt / "meta.json").write_text(json.dumps(meta))


# (id, scenario or None, overrides, the start of the error line after "error: ")
CASES = [
    ("unknown key", None, ["trainer.learning_rate=1e-3"], "trainer.learning_rate is not a known setting"),
    ("unknown model", None, ["model=mistral"], "model 'mistral' is not a known option; choose one of: "),
    ("wrong type", None, ["trainer.max_steps=ten"], "trainer.max_steps "),
    ("out of range lr", None, ["trainer.lr=-1"], "trainer.lr is -1.0, must be > 0"),
    ("out of range dropout", None, ["model.dropout=1.5"], "model.dropout is 1.5, must be in [0, 1.0)"),
    ("zero degree", None, ["parallel.tp=0"], "parallel.tp is 0, must be > 0"),
    ("tp not dividing heads", None, ["parallel.tp=3"], "parallel.tp (3) does not divide model.num_heads (4)"),
    ("kv heads not dividing heads", None, ["model=llama_tiny", "model.num_kv_heads=3"],
     "model.num_kv_heads (3) does not divide model.num_heads (4)"),
    ("tp not fitting kv heads", None, ["model=llama_tiny", "model.hidden_size=96", "model.num_heads=12",
                                       "model.num_kv_heads=3", "parallel.tp=4"],
     "parallel.tp (4) neither divides nor is a multiple of model.num_kv_heads (3)"),
    ("Llama setting on GPT", None, ["model.num_kv_heads=2"], "model.num_kv_heads is 2 with model.arch=gpt"),
    ("document mask on BERT", None, ["model=bert_tiny", "data.document_mask=true"],
     "data.document_mask is set with model.arch=bert"),
    ("document mask with Linformer", None, ["model=bert_tiny", "model.attention=linformer", "data.document_mask=true"],
     "data.document_mask is true with model.attention=linformer"),
    ("unknown document positions", None, ["model=llama_tiny", "data.document_positions=reset"],
     "data.document_positions is 'reset', not one of restart, continue"),
    ("sp not dividing the sequence", None, ["model=bert_tiny", "data.seq_len=100", "parallel.sp=3"],
     "data.seq_len (100) is not divisible by 3"),
    ("pp above layers", None, ["parallel.pp=8"], "parallel.pp (8) needs 8 pipeline stages"),
    ("microbatches not dividing", None, ["parallel.pp=2", "parallel.microbatches=3"],
     "parallel.microbatches (3) does not divide the per-rank batch (16"),
    ("batch not divisible by dp", None, ["parallel.dp=3"], "trainer.global_batch_size (16) is not divisible by parallel.dp"),
    ("ulysses heads", None, ["parallel.sp=8", "parallel.sp_impl=ulysses", "data.seq_len=256"],
     "parallel.sp (8) does not divide the 4 attention heads"),
    ("unknown sp_impl", None, ["parallel.sp_impl=flash"], "parallel.sp_impl is 'flash', not one of ring, rsa, ulysses"),
    ("no GPU for device=cuda", None, ["device=cuda"], "device is cuda but no CUDA device is visible"),
    ("sequence above positions", None, ["data.seq_len=512"], "data.seq_len (512) is longer than model.max_seq_len (256)"),
    ("negative checkpoint.every", None, ["checkpoint.every=-1"], "checkpoint.every is -1, must be >= 0"),
    ("missing data file", None, ["data=text_files", "data.paths=[/no/such/corpus.txt]"],
     "data.paths entry '/no/such/corpus.txt' matches no file"),
    ("empty data file", "empty", [], "data.paths file "),
    ("binary data file", "binary", [], "data.paths file "),
    ("not UTF-8", "latin1", [], "data.paths file "),
    ("directory as data file", "directory", [], "data.paths entry "),
    ("missing tokenizer", None, ["data.tokenizer=/no/such/tokenizer"], "data.tokenizer (/no/such/tokenizer) is not a directory"),
    ("tokenizer larger than vocab", "small_vocab", [], "model.vocab_size (1024) is smaller than the tokenizer's vocabulary (4096)"),
    ("tokenizer without the arch's specials", "bert_with_gpt_tokenizer", [], "data.tokenizer ("),
    ("unreadable tokenizer", "tokenizer_not_loadable", [], "data.tokenizer ("),
    ("prepared data without a path", None, ["data=prepared"], "data.path is not set for data.source=prepared"),
    ("missing prepared data", None, ["data=prepared", "data.path=/no/such/prepared"],
     "data.path (/no/such/prepared) is not a directory"),
    ("missing init_from", None, ["model.init_from=/no/such/model"], "model.init_from (/no/such/model) is not a transformers"),
    ("missing checkpoint", None, ["checkpoint.resume=/no/such/step_00000007"], "checkpoint.resume (/no/such/step_00000007) is not a directory"),
    ("truncated checkpoint", "truncated", [], "checkpoint.resume ("),
    ("half-written checkpoint", "half_written", [], "checkpoint.resume ("),
    ("corrupted meta.json", "meta_garbage", [], "checkpoint.resume ("),
    ("code in the checkpoint index", "pickled_code", [], "checkpoint.resume ("),
    ("pickled object in place of a tensor", "bytes_entry", [], "checkpoint.resume ("),
    ("checkpoint of another model", "checkpoint", ["model.hidden_size=64"], "checkpoint.resume ("),
    ("checkpoint of another batch", "checkpoint", ["trainer.global_batch_size=8"], "checkpoint.resume ("),
    ("checkpoint of another sequence length", "checkpoint", ["data.seq_len=64"], "checkpoint.resume ("),
    ("checkpoint of another engine", "checkpoint", ["trainer.engine=deepspeed", "parallel.dp=2"], "checkpoint.resume ("),
    ("ZeRO with tensor parallelism", None, ["trainer.engine=deepspeed", "parallel.dp=2", "parallel.tp=2"],
     "parallel.tp is 2 with trainer.engine=deepspeed"),
    ("ZeRO stage without DeepSpeed", None, ["trainer.zero_stage=3"], "trainer.zero_stage is 3 but trainer.engine is seqpar"),
    ("activation sharding with pp", None, ["parallel.tp=2", "parallel.pp=2", "parallel.tp_shard_activations=true"],
     "parallel.tp_shard_activations is set with parallel.pp=2"),
    ("auto layout with a degree set", None, ["parallel=auto", "parallel.sp=2"],
     "parallel.auto chooses dp/pp/tp/sp itself but sp=2 is set"),
    ("auto layout that cannot fit", None, ["parallel=auto", "parallel.devices=2", "parallel.device_mem_gib=0.01"],
     "parallel.auto finds no layout of 2 devices that fits 0.0 GiB per device"),
]
# What the damaged-checkpoint cases must say beyond naming the setting.
DETAIL = {
    "truncated checkpoint": "file __0_0.distcp has",
    "half-written checkpoint": "has no meta.json: a half-written checkpoint",
    "corrupted meta.json": "has a corrupted meta.json",
    "code in the checkpoint index": "has an unreadable tensor index .metadata",
    "pickled object in place of a tensor": "refusing to load torch.distributed.checkpoint.metadata.BytesStorage",
    "checkpoint of another model": "holds another model: model.hidden_size is 128 there, 64 here",
    "checkpoint of another batch": "was trained with trainer.global_batch_size=16, this run has 8",
    "checkpoint of another sequence length": "was trained with data.seq_len=128, this run has data.seq_len=64",
    "checkpoint of another engine": "was written with trainer.engine=seqpar, this run has trainer.engine=deepspeed "
                                    "trainer.zero_stage=1",
    "empty data file": "is empty",
    "binary data file": "looks binary",
    "not UTF-8": "is not UTF-8 text",
    "directory as data file": "is a directory",
    "tokenizer without the arch's specials": "has no cls_token_id",
    "unreadable tokenizer": "could not be loaded",
}


def error_line(argv: list[str], capsys) -> str:
    """Run the command line's checks; the one stderr line they print (exit code 2 asserted)."""
    with pytest.raises(SystemExit) as exit_info:
        preflight(CONFIG_DIR, argv)
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in out.err + out.out, out.err
    assert lines[0].startswith("error: ") and "; " in lines[0]
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize("name,scenario,overrides,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_error_line_and_keeps_saved_files(tmp_path, saved, capsys, monkeypatch, name, scenario,
                                                              overrides, expected):
    monkeypatch.chdir(tmp_path)  # a code-executing pickle would write ./pwned here
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    extra = _scenario(scenario, saved, tmp_path) if scenario else []
    before = _digest(saved)
    line = error_line([*overrides, *extra, f"hydra.run.dir={saved}"], capsys)
    assert line.startswith(expected), line
    assert DETAIL.get(name, "") in line, line
    assert _digest(saved) == before  # nothing saved was touched
    assert not (tmp_path / "pwned").exists()


def test_a_fresh_start_never_overwrites_checkpoints(saved, capsys):
    line = error_line(["checkpoint.resume=never", f"hydra.run.dir={saved}"], capsys)
    assert line.startswith(f"checkpoint.resume is never but {saved / 'checkpoints'} already holds checkpoints")


def test_world_size_must_match_the_launcher(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = error_line(["parallel.sp=2"], capsys)
    assert line.startswith("parallel dp*pp*tp*sp = 2 but the launcher started 3 processes")


def test_changed_checkpoint_bytes_are_caught_by_their_checksum(tmp_path, saved, cache_dir):
    """Bytes changed in place (same size) pass the entry point's checks; the ranks' CRC check stops the run before
    anything is loaded or written (train.py prints the UserError as its one `error:` line, exit 2)."""
    from seqpar.cli import compose
    from seqpar.errors import UserError
    from seqpar.preflight import prepare
    from seqpar.trainer.job import run_rank

    ckpt = _copy_checkpoint(saved, tmp_path)
    f = ckpt / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    before = _digest(ckpt)
    cfg = compose(CONFIG_DIR, [f"checkpoint.resume={ckpt}", "trainer.max_steps=4", *FAST])
    cfg.run_dir = str(tmp_path / "run")
    job = prepare(cfg)  # sizes match: only the content changed
    with pytest.raises(UserError) as info:
        run_rank(job)
    assert str(info.value).startswith(f"checkpoint.resume ({ckpt}) file __0_0.distcp does not match its recorded checksum")
    assert _digest(ckpt) == before
    assert not (tmp_path / "run").exists()


def test_docs_list_every_case():
    doc = (ROOT / "docs" / "bad-input.md").read_text()
    for name, *_ in CASES:
        assert f"| {name} |" in doc, name


def test_export_of_a_missing_checkpoint_names_its_argument(tmp_path, capsys):
    from seqpar.export import main

    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint ({tmp_path / 'nothing'}) is not a directory; pass the path of a step_* "
                   "checkpoint directory or of a directory holding them"]
    assert not (tmp_path / "out").exists()
