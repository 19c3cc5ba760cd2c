"""The tokenized documents of a run, cached as arrays so that the next run on the same text starts without `datasets`.

Every training process needs the token ids of its corpus, split into training and validation documents. Making them
goes through `datasets` (load, filter, split, tokenize with map), whose import and cache reads cost a few seconds per
process even when nothing has changed. The result is kept here, one `.npz` per (text, tokenizer settings) under
`<cache>/sequences/`: each split as one flat int32 array of ids with the offsets of its documents.

An entry is used only when it still describes the same inputs:
- the text: the built-in corpus file or the local text files, by path, size and modification time (as `datasets`
  fingerprints local files); hub datasets are not cached here (`datasets` has to load them anyway);
- the tokenizer: the settings that choose it (architecture, vocabulary size, or the tokenizer directory's files)
  are in the key, and the entry records a digest of the tokenizer it was made with, checked against the one
  loaded now (a tokenizer trained again after its cache was removed breaks ties differently);
- the split (`data.val_fraction`) and this module's format version.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from seqpar.config import Config
from seqpar.data.corpus import builtin_corpus_file, cache_root, resolve_text_files
from seqpar.data.tokenizer import tokenizer_digest

FORMAT = 1  # bump when the way documents are read, filtered, split or tokenized changes


def _files_identity(files) -> list:
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out


def entry_path(cfg: Config) -> Path | None:
    """Where the tokenized documents of this config are cached, or None when they are not cached (hub datasets)."""
    d = cfg.data
    if d.source == "builtin":
        text = _files_identity([builtin_corpus_file(d)])
    elif d.source == "text_files":
        text = [d.sample_by, d.text_column, _files_identity(resolve_text_files(d.paths))]
    else:
        return None
    if d.tokenizer:
        names = sorted(p for p in Path(d.tokenizer).iterdir() if p.is_file())
        tokenizer = ["dir", _files_identity(names)]
    else:
        tokenizer = ["trained", cfg.model.arch, cfg.model.vocab_size]
    key = json.dumps([FORMAT, d.source, text, tokenizer, d.val_fraction], sort_keys=True)
    return cache_root(d) / "sequences" / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"


# What reading a damaged entry (truncated, overwritten by something else) raises; such an entry is made again.
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def read_meta(path: Path) -> dict | None:
    """The entry's record of how it was made ({"corpus_id", "tokenizer"}), or None if there is no usable entry."""
    try:
        with np.load(path) as z:
            return json.loads(str(z["meta"]))
    except _UNREADABLE:
        return None


def read_documents(path: Path) -> list[list[np.ndarray]] | None:
    """[training documents, validation documents], each a list of int32 id arrays (views of one array), or None
    if the entry cannot be read."""
    try:
        with np.load(path) as z:
            return [np.split(z[f"{part}_ids"], z[f"{part}_offsets"][1:-1]) for part in ("train", "val")]
    except _UNREADABLE:
        return None


def write(path: Path, parts: list[list], corpus_id: str, tok) -> None:
    """Save the documents of both splits (written to a temporary file and renamed: never half-written)."""
    digest = tokenizer_digest(tok)
    if digest is None:
        return
    arrays = {"meta": np.array(json.dumps({"corpus_id": corpus_id, "tokenizer": digest}))}
    for name, docs in zip(("train", "val"), parts, strict=True):
        lengths = np.fromiter((len(doc) for doc in docs), dtype=np.int64, count=len(docs))
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum(lengths)])
        arrays[f"{name}_ids"] = np.fromiter((t for doc in docs for t in doc), dtype=np.int32, count=int(lengths.sum()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
