"""Writing a prepared dataset: documents streamed in, tokens written as they come, resumable, manifest last.

`prepare_dataset(cfg, out)` reads the source's documents once (after the tokenizer's sample, if one is trained),
encodes them in parallel batches and appends each batch's ids to the current shard's files under temporary names.
When a shard holds `data.shard_tokens` training tokens it is synced and renamed, and `progress.json` records it
with the number of source documents consumed so far. A prepare that stops (killed, a full disk) is run again with
the same command: it keeps the recorded shards, skips the documents they hold and goes on. The manifest is written
last, so a directory without one is never taken for a dataset.

The validation split is chosen by document position: document i (counting the source's non-empty documents from
0) goes to validation when floor((i + 1) * f) > floor(i * f) for f = `data.val_fraction`, i.e. every 1/f-th
document, spread evenly over the corpus and the same on every machine without a shuffle of the whole corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from seqpar.config import Config
from seqpar.data.prepared.encode import BATCH_CHARS, batches, encode, make_tokenizer, worker_count
from seqpar.data.prepared.format import (
    FORMAT,
    MANIFEST,
    PROGRESS,
    SPLITS,
    TMP_PREFIX,
    TOKENIZER_DIR,
    TokenStream,
    dataset_id,
    pack_file,
    read_manifest,
    shard_file,
    token_dtype,
    write_json,
)
from seqpar.data.prepared.sources import documents, source_bytes, source_description, source_fingerprint
from seqpar.data.prepared.windows import pack_bounds
from seqpar.data.tokenizer import load_tokenizer_dir, tokenizer_digest
from seqpar.errors import UserError


def is_validation(index: np.ndarray, fraction: float) -> np.ndarray:
    """Which of the documents at positions `index` belong to the validation split (see the module docstring)."""
    return np.floor((index + 1) * fraction) > np.floor(index * fraction)


def with_separator(ids: np.ndarray, lengths: np.ndarray, separator: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document's ids followed by `separator`."""
    out = np.full(len(ids) + len(lengths), separator, dtype=ids.dtype)
    is_token = np.ones(len(out), dtype=bool)
    is_token[np.cumsum(lengths + 1) - 1] = False
    out[is_token] = ids
    return out, lengths + 1


class _SplitFile:
    """One split of the shard being written: its token file and document index, under temporary names."""

    def __init__(self, root: Path, split: str, shard: int):
        self.root, self.names = root, [shard_file(split, shard, "bin"), shard_file(split, shard, "idx")]
        self.bin = open(root / (TMP_PREFIX + self.names[0]), "wb")
        self.idx = open(root / (TMP_PREFIX + self.names[1]), "wb")
        self.idx.write(np.zeros(1, dtype="<i8").tobytes())
        self.tokens = self.documents = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.bin.write(ids.tobytes())
        self.idx.write((self.tokens + np.cumsum(lengths, dtype=np.int64)).astype("<i8").tobytes())
        self.tokens += len(ids)
        self.documents += len(lengths)

    def commit(self) -> dict:
        for f in (self.bin, self.idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for name in self.names:
            os.replace(self.root / (TMP_PREFIX + name), self.root / name)
        return {"documents": self.documents, "tokens": self.tokens}


class ShardWriter:
    """Appends encoded batches to shards; each full shard is committed and recorded in `progress`."""

    def __init__(self, root: Path, progress: dict, dtype: np.dtype, separator: int | None, fraction: float,
                 shard_tokens: int, on_shard: Callable[[dict], None] | None = None):
        self.root, self.progress, self.dtype, self.separator = root, progress, dtype, separator
        self.fraction, self.shard_tokens, self.on_shard = fraction, shard_tokens, on_shard
        self.document = progress["next_document"]  # source position of the next document
        self.current: dict[str, _SplitFile] | None = None
        self.first = self.document

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        val = is_validation(self.document + np.arange(len(lengths)), self.fraction)
        if self.separator is not None:
            ids, lengths = with_separator(ids, lengths, self.separator)
        ids = ids.astype(self.dtype)
        token_val = np.repeat(val, lengths)
        if self.current is None:
            k = len(self.progress["shards"])
            self.current, self.first = {s: _SplitFile(self.root, s, k) for s in SPLITS}, self.document
        self.current["train"].add(ids[~token_val], lengths[~val])
        self.current["val"].add(ids[token_val], lengths[val])
        self.document += len(lengths)
        if self.current["train"].tokens >= self.shard_tokens:
            self.commit()

    def commit(self) -> None:
        if self.current is None:
            return
        entry = {"index": len(self.progress["shards"]), "first_document": self.first, "end_document": self.document}
        entry.update({s: f.commit() for s, f in self.current.items()})
        self.current = None
        self.progress["shards"].append(entry)
        self.progress["next_document"] = self.document
        write_json(self.root / PROGRESS, self.progress)
        if self.on_shard is not None:
            self.on_shard(entry)


class Rate:
    """A progress line on stderr: text read (MiB, MiB/s), tokens (tokens/s), and the time left when the source's
    size is known. Rewritten in place on a terminal, a line every `interval` seconds otherwise."""

    def __init__(self, total_bytes: int | None, done_bytes: int = 0, interval: float | None = None):
        self.total, self.read, self.tokens = total_bytes, done_bytes, 0
        self.start_read, self.start = done_bytes, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.last = self.start

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        speed = (self.read - self.start_read) / elapsed
        text = (f"prepare: {self.read / 2**20:.1f} MiB read ({speed / 2**20:.2f} MiB/s), {self.tokens:,} tokens "
                f"({self.tokens / elapsed:,.0f} tokens/s)")
        if self.total and speed > 0:
            left = max(self.total - self.read, 0) / speed
            text += f", {min(100, 100 * self.read / self.total):.0f}%, {int(left) // 60}:{int(left) % 60:02d} left"
        return text

    def update(self, read: int = 0, tokens: int = 0, final: bool = False) -> None:
        self.read += read
        self.tokens += tokens
        now = time.perf_counter()
        if final or now - self.last >= self.interval:
            self.last = now
            end = "\n" if final or not self.tty else ""
            print(("\r" if self.tty else "") + self.line(), end=end, file=sys.stderr, flush=True)


def settings(cfg: Config) -> dict:
    """What decides the prepared contents (a resumed or repeated prepare must have the same)."""
    d = cfg.data
    tokenizer = (os.path.abspath(d.tokenizer) if d.tokenizer
                 else {"trained": cfg.model.vocab_size, "sample_mib": d.tokenizer_sample_mib})
    return {"format": FORMAT, "arch": cfg.model.arch, "source": source_description(d),
            "fingerprint": source_fingerprint(d), "tokenizer": tokenizer, "val_fraction": d.val_fraction,
            "shard_tokens": d.shard_tokens}


def _out_error(out: Path, problem: str, fix: str) -> UserError:
    return UserError("--out", f"({out}) {problem}", fix)


def _start(cfg: Config, out: Path, settings: dict) -> tuple[dict, object]:
    """(progress, tokenizer): those of the unfinished prepare in `out`, or a fresh start with its tokenizer."""
    progress_file = out / PROGRESS
    for p in out.glob(TMP_PREFIX + "*"):  # what an interrupted prepare was writing
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if progress_file.is_file():
        try:
            progress = json.loads(progress_file.read_text(encoding="utf-8"))
            same = progress["settings"] == settings
        except (ValueError, KeyError, TypeError):
            raise _out_error(out, "holds an unreadable progress.json", "remove the directory and prepare again") from None
        if not same:
            raise _out_error(out, "holds an unfinished prepare of other data or settings",
                             "run the command that started it again, or remove the directory, or choose another --out")
        tok = load_tokenizer_dir(str(out / TOKENIZER_DIR), cfg.model.arch)
        if tokenizer_digest(tok) != progress["tokenizer_digest"]:
            raise _out_error(out, "has a tokenizer/ that is not the one its shards were made with",
                             "remove the directory and prepare again")
        return progress, tok
    if any(out.iterdir()):
        raise _out_error(out, "is not empty and holds no prepared dataset", "choose an empty or new --out directory")
    docs = documents(cfg.data)
    if next(docs, None) is None:
        raise UserError("data", "has no non-empty text", "point data.paths / data.hf_name at text")
    tok = make_tokenizer(cfg, lambda: documents(cfg.data))
    tmp = out / (TMP_PREFIX + TOKENIZER_DIR)
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out / TOKENIZER_DIR)
    progress = {"settings": settings, "tokenizer_digest": tokenizer_digest(tok), "shards": [], "next_document": 0}
    write_json(progress_file, progress)
    return progress, tok


def _counted(texts: Iterable[str], rate: Rate, skip: int) -> Iterator[str]:
    """`texts` from position `skip` on, counting the text read."""
    for i, text in enumerate(texts):
        rate.read += len(text)
        if i >= skip:
            yield text
        else:
            rate.start_read = rate.read  # skipped text is not part of this run's speed


def prepare_dataset(cfg: Config, out: Path, on_shard: Callable[[dict], None] | None = None) -> dict:
    """Prepare the configured source into `out` (see the module docstring); returns the manifest. A complete
    dataset of the same settings already there is returned as it is."""
    d = cfg.data
    if d.source == "prepared":
        raise UserError("data.source", "is prepared: that data is prepared already",
                        "pass the overrides of a raw source (data=builtin, text_files or hf_dataset)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _out_error(out, f"cannot be created ({e.strerror})", "choose a writable --out directory") from None
    expected = settings(cfg)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("settings") != expected:
            raise _out_error(out, "holds a prepared dataset of other data or settings",
                             "choose another --out directory, or remove it to prepare again")
        return manifest
    progress, tok = _start(cfg, out, expected)
    dtype = token_dtype(len(tok))
    separator = tok.eos_token_id if cfg.model.arch == "gpt" else None
    writer = ShardWriter(out, progress, dtype, separator, d.val_fraction, d.shard_tokens, on_shard)
    rate = Rate(source_bytes(d))
    texts = _counted(documents(d), rate, progress["next_document"])
    tokenizer_json = tok.backend_tokenizer.to_str()
    for ids, lengths in encode(tokenizer_json, batches(texts, min(BATCH_CHARS, 2 * d.shard_tokens)), worker_count(d.num_proc)):
        writer.add(ids, lengths)
        rate.update(tokens=len(ids))
    writer.commit()
    rate.update(final=True)
    return _finish(cfg, out, progress, tok, dtype, separator)


def _finish(cfg: Config, out: Path, progress: dict, tok, dtype: np.dtype, separator: int | None) -> dict:
    splits = {s: {k: sum(sh[s][k] for sh in progress["shards"]) for k in ("documents", "tokens")} for s in SPLITS}
    if splits["train"]["tokens"] == 0:
        raise UserError("data", "has no text that tokenizes to any token", "point data.paths / data.hf_name at text")
    manifest = {
        "format": FORMAT, "settings": progress["settings"], "arch": cfg.model.arch, "dtype": dtype.str,
        "separator": separator, "val_fraction": cfg.data.val_fraction,
        "source": {**progress["settings"]["source"], "fingerprint": progress["settings"]["fingerprint"],
                   "documents": progress["next_document"]},
        "tokenizer": {"dir": TOKENIZER_DIR, "digest": progress["tokenizer_digest"], "vocab_size": len(tok)},
        "splits": splits, "shards": progress["shards"], "packs": {},
    }
    if cfg.model.arch == "bert":  # the packing of the configured seq_len; others are made when first read
        for split in SPLITS:
            bounds = pack_bounds(TokenStream(out, split, manifest).document_lengths(), cfg.data.seq_len - 2)
            name = pack_file(split, cfg.data.seq_len)
            tmp = out / (TMP_PREFIX + name)
            with open(tmp, "wb") as f:
                np.save(f, bounds)
            os.replace(tmp, out / name)
            manifest["packs"][name] = {"windows": len(bounds) - 1}
    manifest["id"] = dataset_id(manifest)
    write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink()
    return manifest
