"""Prepared datasets (`seqpar.prepare`): the on-disk format round-trips the tokenizer's output, an interrupted
prepare resumes, and every kind of damage is one `error:` line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from seqpar.config import Config, DataConfig, ModelConfig, TrainerConfig
from seqpar.data.prepared.format import MANIFEST, PROGRESS, read_manifest, token_dtype
from seqpar.data.prepared.sources import documents
from seqpar.data.prepared.windows import open_prepared, pack_bounds
from seqpar.data.prepared.writer import is_validation, prepare_dataset
from seqpar.data.sequences import build_sequences, pack_windows
from seqpar.errors import UserError
from seqpar.trainer.checkpoint.compat import check_same_sequences, sequences_record

from ..conftest import ROOT, cli_env

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "calendar.py", "heapq.py", "bisect.py"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """About 110 KB of text: some of the standard library's sources, copied."""
    root = tmp_path_factory.mktemp("corpus")
    for name in FILES:
        shutil.copy(STDLIB / name, root / name)
    return [str(root / name) for name in FILES]


def config(corpus, arch="gpt", **data) -> Config:
    return Config(
        model=ModelConfig(arch=arch, vocab_size=data.pop("vocab_size", 512), max_seq_len=64),
        data=DataConfig(source="text_files", paths=corpus, seq_len=64, num_proc=1, val_fraction=0.1, **data),
        trainer=TrainerConfig(global_batch_size=4),
    )


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for arch in ("gpt", "bert"):
        out[arch] = tmp_path_factory.mktemp(f"prepared-{arch}") / "data"
        prepare_dataset(config(corpus, arch), out[arch])
    return out


def damaged(prepared: dict, tmp_path: Path, arch: str = "gpt") -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(prepared[arch], copy)
    return copy


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_prepared_tokens_are_the_tokenizers_output_split_by_document(prepared, corpus, arch):
    data = open_prepared(prepared[arch], arch, 512)
    tok = data.tokenizer
    docs = list(documents(config(corpus, arch).data))
    val = is_validation(np.arange(len(docs)), 0.1)
    assert 0 < val.sum() < len(docs) and data.manifest["source"]["documents"] == len(docs)
    separator = data.manifest["separator"]
    assert (separator == tok.eos_token_id) if arch == "gpt" else separator is None
    counters = {"train": 0, "val": 0}
    for doc, is_val in zip(docs, val, strict=True):
        split = "val" if is_val else "train"
        ids = data.streams[split].document(counters[split]).tolist()
        counters[split] += 1
        expected = tok(doc, add_special_tokens=False)["input_ids"]
        assert ids == (expected + [separator] if arch == "gpt" else expected)
    assert counters == {s: data.streams[s].documents for s in counters}
    assert data.manifest["dtype"] == "<u2" and data.streams["train"][0:5].dtype == np.uint16


def test_gpt_windows_are_slices_of_the_stream_and_bert_windows_the_in_memory_packing(prepared):
    gpt = build_sequences(_prepared_cfg(prepared, "gpt"))
    stream = gpt.train.stream
    for i in (0, 7, len(gpt.train) - 1):
        ex = gpt.train.get(i)
        assert ex["input_ids"].tolist() == stream[i * 64 : i * 64 + 64].tolist()
        assert ex["labels"].tolist() == stream[i * 64 + 1 : i * 64 + 65].tolist()
    bert = build_sequences(_prepared_cfg(prepared, "bert"))
    data = open_prepared(prepared["bert"], "bert", 512)
    docs = [data.streams["train"].document(i) for i in range(data.streams["train"].documents)]
    tok = bert.tokenizer
    windows, lengths = pack_windows(docs, 64, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    assert len(bert.train) == len(windows) and (bert.train.lengths == lengths).all()
    assert all((bert.train.windows[i] == windows[i]).all() for i in range(len(windows)))
    assert bert.dataset_id == data.manifest["id"]
    # The packing stored at prepare time (seq_len 64) equals the one made from the index for that length.
    stored = np.load(prepared["bert"] / "pack-train-L64.npy")
    assert (stored == pack_bounds(data.streams["train"].document_lengths(), 62)).all()


def _prepared_cfg(prepared, arch) -> Config:
    return Config(model=ModelConfig(arch=arch, vocab_size=512, max_seq_len=64),
                  data=DataConfig(source="prepared", path=str(prepared[arch]), seq_len=64),
                  trainer=TrainerConfig(global_batch_size=4))


def test_token_dtype_is_uint16_while_the_vocabulary_fits():
    assert token_dtype(512) == np.uint16 and token_dtype(1 << 16) == np.uint16
    assert token_dtype((1 << 16) + 1) == np.uint32


def test_a_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    """A word-level tokenizer of 70,000 words: ids above 65,535 survive the round trip."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<unk>"] + [f"w{i}" for i in range(70_000)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(tmp_path / "tok")
    text = tmp_path / "words.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(50)) for i in range(40)))
    cfg = config([str(text)], tokenizer=str(tmp_path / "tok"), vocab_size=70_016)
    manifest = prepare_dataset(cfg, tmp_path / "out")
    assert manifest["dtype"] == "<u4"
    data = open_prepared(tmp_path / "out", "gpt", 70_016)
    first = data.streams["train"].document(0)[:-1]
    assert first.tolist() == [(j * 104729) % 70_000 + 2 for j in range(50)] and first.max() > 65_535


def test_an_interrupted_prepare_resumes_where_it_stopped(corpus, prepared, tmp_path):
    """Stopped after its second shard (and with a half-written third left behind), the same command keeps the
    finished shards and writes what an uninterrupted prepare writes."""
    tokenizer = tmp_path / "tok"
    open_prepared(prepared["gpt"], "gpt", 512).tokenizer.save_pretrained(tokenizer)
    cfg = config(corpus, tokenizer=str(tokenizer), shard_tokens=4000)

    class Stop(Exception):
        pass

    def stop_after_second(entry):
        if entry["index"] == 1:
            raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        prepare_dataset(cfg, out, on_shard=stop_after_second)
    assert (out / PROGRESS).is_file() and not (out / MANIFEST).exists()
    with pytest.raises(UserError, match="unfinished prepare"):
        read_manifest(out)
    (out / ".tmp-train-00002.bin").write_bytes(b"\x00" * 100)  # what a killed prepare leaves
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[01].*")}
    assert len(kept) == 8

    seen = []
    manifest = prepare_dataset(cfg, out, on_shard=seen.append)
    assert seen[0]["index"] == 2 and len(manifest["shards"]) > 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[01].*")} == kept
    assert not (out / PROGRESS).exists() and not list(out.glob(".tmp-*"))

    whole = tmp_path / "whole"
    assert prepare_dataset(cfg, whole)["splits"] == manifest["splits"]
    for f in sorted(whole.glob("*.bin")) + sorted(whole.glob("*.idx")):
        assert f.read_bytes() == (out / f.name).read_bytes(), f.name


def test_worker_processes_write_what_one_process_writes(corpus, prepared, tmp_path):
    """Batches encoded by a pool of workers come back in document order: the same bytes as encoding in-process,
    so a corpus gives the same dataset (and id, and so the same windows and losses) whatever data.num_proc."""
    tokenizer = tmp_path / "tok"
    open_prepared(prepared["gpt"], "gpt", 512).tokenizer.save_pretrained(tokenizer)
    made = {}
    for num_proc in (1, 2):
        out = tmp_path / f"num_proc{num_proc}"
        cfg = config(corpus, tokenizer=str(tokenizer), shard_tokens=4000)  # 8,000-character batches, several shards
        cfg.data.num_proc = num_proc
        made[num_proc] = (out, prepare_dataset(cfg, out))
    (one, m1), (two, m2) = made[1], made[2]
    assert len(m1["shards"]) > 3 and m1["id"] == m2["id"] and m1["shards"] == m2["shards"]
    for f in sorted(one.glob("*.bin")) + sorted(one.glob("*.idx")):
        assert f.read_bytes() == (two / f.name).read_bytes(), f.name


# One of two encoding workers never starts (as one whose fork copied a held lock would), and the parent has a
# SIGTERM handler that only records the signal (as a trainer or launcher installs): the other worker encodes
# everything, and the pool's shutdown must still stop the stuck one.
STUCK_WORKER = """
import os, signal, sys, time
from tokenizers import Tokenizer, models, pre_tokenizers
from seqpar.data.prepared import encode

marker = sys.argv[1]
def stuck_once(tokenizer_json):
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return encode._init_worker_original(tokenizer_json)
    while True:
        time.sleep(1)

encode._init_worker_original, encode._init_worker = encode._init_worker, stuck_once
signal.signal(signal.SIGTERM, lambda signum, frame: None)
tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
out = list(encode.encode(tok.to_str(), [["a b a"] * 4 for _ in range(6)], 2))
assert len(out) == 6 and all(ids.tolist() == [0, 1, 0] * 4 for ids, _ in out)
assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the caller's handler is back
print("done")
"""


def test_a_stuck_worker_does_not_hang_the_pools_shutdown(tmp_path):
    proc = subprocess.run([sys.executable, "-c", STUCK_WORKER, str(tmp_path / "marker")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_truncated_token_file(prepared, tmp_path):
    root = damaged(prepared, tmp_path)
    f = root / "train-00000.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"data.path .*train-00000.bin has \d+ bytes, the manifest says \d+: truncated") as e:
        open_prepared(root, "gpt", 512)
    _one_line(e)


@pytest.mark.parametrize("damage", ["truncated", "end", "decreasing"])
def test_corrupted_document_index(prepared, tmp_path, damage):
    root = damaged(prepared, tmp_path)
    f = root / "train-00000.idx"
    starts = np.fromfile(f, dtype="<i8")
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[:-8])
    else:
        if damage == "end":
            starts[-1] += 1
        else:
            starts[len(starts) // 2] = starts[-1] + 5
        starts.tofile(f)
    match = "has \\d+ bytes" if damage == "truncated" else "corrupted document index train-00000.idx"
    with pytest.raises(UserError, match=match) as e:
        open_prepared(root, "gpt", 512).streams["train"][0:10]
    _one_line(e)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: m.update(format=2), "has format 2; this seqpar reads format 1"),
    (lambda m: m["tokenizer"].update(digest="0" * 40), "tokenizer/ that is not the one its tokens were made with"),
    (lambda m: m["tokenizer"].update(vocab_size=70_000), "stores ids as uint16 but its tokenizer has 70000 tokens"),
    (lambda m: m.update(arch="bert"), "was prepared for model.arch=bert, this run has gpt"),
])
def test_a_manifest_that_does_not_match_is_refused(prepared, tmp_path, edit, match):
    root = damaged(prepared, tmp_path)
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=match) as e:
        open_prepared(root, "gpt", 1 << 17)
    _one_line(e)


def test_missing_and_unfinished_directories_are_not_datasets(prepared, tmp_path):
    with pytest.raises(UserError, match="data.path .* is not a directory"):
        open_prepared(tmp_path / "nothing", "gpt", 512)
    root = damaged(prepared, tmp_path)
    (root / MANIFEST).unlink()  # a leftover of a prepare that never finished
    with pytest.raises(UserError, match="unfinished prepare .*run the same python -m seqpar.prepare command again"):
        open_prepared(root, "gpt", 512)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no prepared dataset"):
        open_prepared(tmp_path / "empty", "gpt", 512)


def test_a_source_without_text_is_refused(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n \n\n\t\n")
    with pytest.raises(UserError, match="^data has no non-empty text"):
        prepare_dataset(config([str(blank)]), tmp_path / "out")


def test_the_command_line_prepares_and_reports_bad_input_in_one_line(corpus, tmp_path):
    def prepare(*args):
        return subprocess.run([sys.executable, "-m", "seqpar.prepare", *args], cwd=ROOT, env=cli_env(tmp_path / "cache"),
                              capture_output=True, text=True, timeout=120)

    files = ",".join(corpus[:3])
    proc = prepare("--out", str(tmp_path / "out"), "data=text_files", f"data.paths=[{files}]", "model.vocab_size=512",
                   "data.num_proc=2")
    assert proc.returncode == 0, proc.stderr
    assert "prepared" in proc.stdout and "data=prepared data.path=" in proc.stdout
    assert "MiB/s" in proc.stderr and "tokens/s" in proc.stderr
    assert read_manifest(tmp_path / "out")["splits"]["train"]["tokens"] > 1000
    again = prepare("--out", str(tmp_path / "out"), "data=text_files", f"data.paths=[{files}]", "model.vocab_size=512")
    assert again.returncode == 0, again.stderr  # already prepared with the same settings: nothing to do
    other = prepare("--out", str(tmp_path / "out"), "data=text_files", f"data.paths=[{files}]", "model.vocab_size=600")
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        f"error: --out ({tmp_path / 'out'}) holds a prepared dataset of other data or settings; choose another --out "
        "directory, or remove it to prepare again"]
    bad = prepare("data=text_files", f"data.paths=[{files}]")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --out is not given; pass --out DIR, the directory to write the prepared dataset into"]


def test_a_checkpoint_of_another_prepared_dataset_is_refused(prepared, tmp_path):
    """meta.json records the dataset's id; the same tokenizer and sequence count on other tokens are refused too."""
    from types import SimpleNamespace

    from seqpar.data.tokenizer import vocab_checksum

    data = build_sequences(_prepared_cfg(prepared, "gpt"))
    meta = {"data": {"vocab_crc32": vocab_checksum(data.tokenizer), "train_sequences": len(data.train),
                     "dataset_id": data.dataset_id}}
    check_same_sequences(tmp_path, meta, sequences_record(data))
    other = SimpleNamespace(tokenizer=data.tokenizer, train=data.train, dataset_id="0123456789abcdef")
    with pytest.raises(UserError, match=rf"checkpoint.resume \({tmp_path}\) was trained on the prepared dataset "
                                        rf"{data.dataset_id}, this run's is 0123456789abcdef"):
        check_same_sequences(tmp_path, meta, sequences_record(other))


BUILD = """
import sys
from seqpar.config import Config, DataConfig, ModelConfig, TrainerConfig
from seqpar.data.sequences import build_sequences
cfg = Config(model=ModelConfig(vocab_size=512, max_seq_len=64), trainer=TrainerConfig(global_batch_size=4),
             data=DataConfig(source="text_files", paths=sys.argv[2:], seq_len=64, num_proc=1, cache_dir=sys.argv[1]))
print(build_sequences(cfg).dataset_id)
"""


def test_processes_starting_together_prepare_raw_text_once(corpus, tmp_path):
    """Ranks (or jobs) that need the same raw text at once: one prepares it into the cache, the others wait on the
    file system and say so, then all read the same dataset."""
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path / "cache"), *corpus], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert sum("preparing text_files data into" in err for _, err in results) == 1
    assert len(list((tmp_path / "cache" / "prepared").glob("*/manifest.json"))) == 1


def test_a_process_waits_on_the_file_lock_with_a_message_while_another_prepares(corpus, tmp_path):
    from filelock import FileLock

    from seqpar.data.prepared.cache import cache_path

    cfg = Config(model=ModelConfig(vocab_size=512, max_seq_len=64), trainer=TrainerConfig(global_batch_size=4),
                 data=DataConfig(source="text_files", paths=corpus, seq_len=64, num_proc=1, cache_dir=str(tmp_path / "cache")))
    root = cache_path(cfg)
    root.parent.mkdir(parents=True)
    with FileLock(f"{root}.lock"):  # another process is preparing
        proc = subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path / "cache"), *corpus], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stderr.readline().startswith(f"waiting for another process to finish preparing {root}")
        assert proc.poll() is None
    out, err = proc.communicate(timeout=120)  # that process died without finishing: this one prepares
    assert proc.returncode == 0, err[-2000:]
    assert (root / "manifest.json").is_file() and out.strip() == json.loads((root / "manifest.json").read_text())["id"]
