"""The prepared-dataset format, and reading it back with every file checked against the manifest.

A prepared directory holds (docs/data.md has the full description):

    manifest.json               written last: its presence marks a complete dataset
    tokenizer/                  the tokenizer the ids were made with (a transformers directory)
    train-00000.bin, ...        one flat token file per shard and split: the documents' ids back to back
    train-00000.idx, ...        int64, documents + 1 entries: where each document starts (0 first, tokens last)
    val-00000.bin/.idx, ...     the validation documents of the same shard
    pack-train-L128.npy, ...    BERT: window boundaries over the split's token stream for seq_len 128
    progress.json               while preparing: the shards finished so far (an interrupted prepare resumes)

Token files are uint16 when the tokenizer's vocabulary fits (at most 65,536 ids), uint32 otherwise, little-endian,
so `numpy.memmap(path, dtype=manifest["dtype"], mode="r")` reads them. For GPT each document's ids are followed by
the end-of-text id (`manifest["separator"]`), so a split's shards read one after another are the token stream
training cuts into windows; BERT tokens have no separator ([CLS]/[SEP] frame each packed window when it is read).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqpar.errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
TMP_PREFIX = ".tmp-"  # files being written; never read, removed when a prepare starts or resumes


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (ids < 2**16), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_file(split: str, shard: int, suffix: str) -> str:
    return f"{split}-{shard:05d}.{suffix}"


def pack_file(split: str, seq_len: int) -> str:
    return f"pack-{split}-L{seq_len}.npy"


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` to `path` atomically (a temporary name, synced, then renamed)."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dataset_id(manifest: dict) -> str:
    """A short digest of what decides the dataset's contents: equal ids, equal token streams."""
    key = [manifest["format"], manifest["source"]["fingerprint"], manifest["tokenizer"]["digest"],
           manifest["val_fraction"], manifest["splits"]]
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _bad(root: Path, problem: str, fix: str = "prepare it again (python -m seqpar.prepare ... --out DIR)") -> UserError:
    return UserError("data.path", f"({root}) {problem}", fix)


def read_manifest(root: Path) -> dict:
    """The manifest of a complete prepared dataset, after checking every file it lists is there with its size."""
    if not root.is_dir():
        raise _bad(root, "is not a directory", "pass the --out directory of python -m seqpar.prepare")
    path = root / MANIFEST
    if not path.is_file():
        if (root / PROGRESS).is_file() or any(root.glob("*.bin")):
            raise _bad(root, "is an unfinished prepare (no manifest.json: it was interrupted)",
                       "run the same python -m seqpar.prepare command again: it continues where it stopped")
        raise _bad(root, "holds no prepared dataset (no manifest.json)", "pass the --out directory of python -m seqpar.prepare")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        fmt = manifest["format"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise _bad(root, "has a corrupted manifest.json") from None
    if fmt != FORMAT:
        raise _bad(root, f"has format {fmt!r}; this seqpar reads format {FORMAT}")
    try:
        dtype = np.dtype(manifest["dtype"])
        shards = manifest["shards"]
        vocab = int(manifest["tokenizer"]["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise _bad(root, "has a corrupted manifest.json") from None
    if dtype not in (np.dtype("<u2"), np.dtype("<u4")):
        raise _bad(root, f"has token dtype {manifest['dtype']!r}, not uint16 or uint32")
    if vocab > np.iinfo(dtype).max + 1:
        raise _bad(root, f"stores ids as {dtype.name} but its tokenizer has {vocab} tokens (ids up to {vocab - 1})")
    for shard in shards:
        for split in SPLITS:
            tokens, docs = shard[split]["tokens"], shard[split]["documents"]
            _check_size(root, shard_file(split, shard["index"], "bin"), tokens * dtype.itemsize)
            name = shard_file(split, shard["index"], "idx")
            _check_size(root, name, (docs + 1) * 8)
            with open(root / name, "rb") as f:  # the ends only: the whole index is checked when first read
                first = np.frombuffer(f.read(8), dtype="<i8")[0]
                f.seek(-8, os.SEEK_END)
                last = np.frombuffer(f.read(8), dtype="<i8")[0]
            if first != 0 or last != tokens:
                raise _bad(root, f"has a corrupted document index {name} (it must run from 0 to {tokens})")
    return manifest


def _check_size(root: Path, name: str, size: int) -> None:
    f = root / name
    if not f.is_file():
        raise _bad(root, f"is missing {name}")
    if f.stat().st_size != size:
        raise _bad(root, f"file {name} has {f.stat().st_size} bytes, the manifest says {size}: truncated or altered")


def _memmap(path: Path, dtype, count: int) -> np.ndarray:
    if count == 0:  # numpy cannot map an empty file
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


@dataclass
class _Shard:
    tokens: np.ndarray  # memory-mapped ids
    starts: np.ndarray  # memory-mapped int64 document starts (documents + 1)


class TokenStream:
    """One split of a prepared dataset: its shards' token files read as one stream, memory-mapped.

    `stream[a:b]` reads only the pages of those tokens; `document(i)` gives the i-th document's ids (with its
    separator, if any). Each shard's index is checked when the shard is first opened."""

    def __init__(self, root: Path, split: str, manifest: dict):
        self.root, self.split = root, split
        self.dtype = np.dtype(manifest["dtype"])
        self._entries = [(s["index"], s[split]["tokens"], s[split]["documents"]) for s in manifest["shards"]]
        self.offsets = np.cumsum([0] + [t for _, t, _ in self._entries], dtype=np.int64)  # token start per shard
        self.doc_offsets = np.cumsum([0] + [d for _, _, d in self._entries], dtype=np.int64)
        self._open: dict[int, _Shard] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def documents(self) -> int:
        return int(self.doc_offsets[-1])

    def shard(self, k: int) -> _Shard:
        if k not in self._open:
            index, tokens, docs = self._entries[k]
            starts = _memmap(self.root / shard_file(self.split, index, "idx"), np.int64, docs + 1)
            check_index(self.root, shard_file(self.split, index, "idx"), starts, tokens)
            self._open[k] = _Shard(_memmap(self.root / shard_file(self.split, index, "bin"), self.dtype, tokens), starts)
        return self._open[k]

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        assert step == 1, "token streams are read in contiguous ranges"
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        k = first
        while start < stop:
            base, end = int(self.offsets[k]), int(self.offsets[k + 1])
            take = min(stop, end)
            if take > start:
                pieces.append(self.shard(k).tokens[start - base : take - base])
            start = max(start, take)
            k += 1
        return np.array(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)

    def document(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.doc_offsets, i, side="right")) - 1
        sh, j = self.shard(k), i - int(self.doc_offsets[k])
        return np.array(sh.tokens[sh.starts[j] : sh.starts[j + 1]])

    def document_lengths(self):
        """Each document's token count (separator included), in order, a shard's index at a time."""
        for k in range(len(self._entries)):
            yield from np.diff(self.shard(k).starts).tolist()


CHECK_CHUNK = 1 << 17  # index entries read at a time when checking an index (1 MiB)


def check_index(root: Path, name: str, starts: np.ndarray, tokens: int) -> None:
    """A shard's document index must start at 0, end at its token count and never decrease.

    The index is read for the check with file reads, a chunk at a time, not through its mapping: pages read
    through a mapping stay in the process's resident set (and in the high-water mark `peak_mem_mib` reports) until
    the kernel needs the memory, so checking that way would add the whole index, 8 bytes per document, to every
    rank's resident memory."""
    if len(starts) == 0 or starts[0] != 0 or starts[-1] != tokens:
        raise _bad(root, f"has a corrupted document index {name} (it must run from 0 to {tokens})")
    previous = 0
    with open(root / name, "rb") as f:
        while len(chunk := np.fromfile(f, dtype="<i8", count=CHECK_CHUNK)):
            if chunk[0] < previous or (np.diff(chunk) < 0).any():
                raise _bad(root, f"has a corrupted document index {name} (its offsets decrease)")
            previous = chunk[-1]
