"""The documents of a text source, streamed one at a time, and what identifies the source.

Every source is read incrementally so that preparing a corpus needs memory for a batch of documents, not the corpus:
- `builtin`: the cached JSON-lines file of the built-in corpus (`seqpar.data.corpus`), a line per document;
- `text_files`: the files in order, cut by `data.sample_by`: `line` (each line), `paragraph` (text between blank
  lines, "\\n\\n"), or `document` (a whole file: the one case that holds a file in memory);
- `hf_dataset`: `datasets.load_dataset(..., streaming=True)`, the `data.text_column` of each row.
Empty and whitespace-only documents are skipped, as training always did.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from seqpar.config import DataConfig
from seqpar.data.corpus import builtin_corpus_file, resolve_text_files
from seqpar.errors import UserError

READ_CHUNK = 1 << 20  # characters read at a time in paragraph mode


def _paragraphs(f) -> Iterator[str]:
    buffer = ""
    while chunk := f.read(READ_CHUNK):
        parts = (buffer + chunk).split("\n\n")
        buffer = parts.pop()
        yield from parts
    yield buffer


def _file_documents(path: str, sample_by: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        if sample_by == "line":
            for line in f:
                yield line.rstrip("\n")
        elif sample_by == "paragraph":
            yield from _paragraphs(f)
        else:
            yield f.read()


def _hf_documents(d: DataConfig) -> Iterator[str]:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset(d.hf_name, d.hf_config, split=d.hf_split, streaming=True)
    for row in ds:
        if d.text_column not in row:
            raise UserError("data.text_column", f"{d.text_column!r} is not a column of the dataset ({sorted(row)})",
                            "set data.text_column")
        yield row[d.text_column]


def _raw_documents(d: DataConfig) -> Iterator[str]:
    if d.source == "builtin":
        with open(builtin_corpus_file(d), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
    elif d.source == "text_files":
        for path in resolve_text_files(d.paths):
            yield from _file_documents(path, d.sample_by)
    else:
        yield from _hf_documents(d)


def documents(d: DataConfig) -> Iterator[str]:
    """The source's non-empty documents, in a fixed order."""
    for text in _raw_documents(d):
        if text and text.strip():
            yield text


def source_bytes(d: DataConfig) -> int | None:
    """The size of the source's files in bytes, when known before reading it (for the time left)."""
    if d.source == "builtin":
        return builtin_corpus_file(d).stat().st_size
    if d.source == "text_files":
        return sum(os.path.getsize(p) for p in resolve_text_files(d.paths))
    return None


def _files_identity(files) -> list:
    return [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]


def source_description(d: DataConfig) -> dict:
    """The settings that name the source (recorded in the manifest)."""
    if d.source == "builtin":
        return {"source": "builtin"}
    if d.source == "text_files":
        return {"source": "text_files", "paths": list(d.paths), "sample_by": d.sample_by}
    return {"source": "hf_dataset", "hf_name": d.hf_name, "hf_config": d.hf_config, "hf_split": d.hf_split,
            "text_column": d.text_column}


def source_fingerprint(d: DataConfig) -> str:
    """A short id of the source's contents: the built-in corpus by its bytes; local files by path, size and
    modification time; a hub dataset by its name, or, for a local dataset path, also its files' identities."""
    key: list = [source_description(d)]
    if d.source == "builtin":
        key.append(hashlib.sha1(builtin_corpus_file(d).read_bytes()).hexdigest())
    elif d.source == "text_files":
        key.append(_files_identity(resolve_text_files(d.paths)))
    elif d.hf_name and Path(d.hf_name).exists():
        root = Path(d.hf_name)
        key.append(_files_identity(sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]))
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
