"""Text sources: the built-in offline corpus and local text files (read, with hub datasets, by
`seqpar.data.prepared.sources`).

The built-in corpus is English prose that every Python installation carries: the docstrings of the standard
library's modules, classes and functions, plus the reference topics of `pydoc_data` (the language reference pages
that `help()` shows). It is extracted with `ast` (no module is imported), one document per docstring, in a fixed
order, and cached as JSON lines keyed by the Python version.
"""

from __future__ import annotations

import ast
import glob
import inspect
import json
import os
import sys
import sysconfig
from pathlib import Path

from seqpar.config import DataConfig
from seqpar.errors import UserError

MIN_DOC_CHARS = 80  # shorter docstrings ("Return self.") carry little language


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("SEQPAR_CACHE") or os.path.join(Path.home(), ".cache", "seqpar")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOC_CHARS:
                docs.append(doc)
    return docs


def builtin_documents() -> list[str]:
    """The built-in corpus as a list of documents (deterministic for a given Python installation)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if any(part in ("site-packages", "dist-packages", "test", "tests", "idle_test") for part in rel):
            continue
        try:
            docs += _docstrings(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    try:
        from pydoc_data.topics import topics

        docs += [inspect.cleandoc(topics[k]) for k in sorted(topics)]
    except ImportError:
        pass
    return docs


def builtin_corpus_file(cfg: DataConfig) -> Path:
    """Path of the cached built-in corpus (JSON lines, one {"text": ...} per document); built on first use."""
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    path = cache_root(cfg) / f"builtin-corpus-{tag}.jsonl"
    if not path.exists():
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):  # written once: jobs starting together on a shared cache wait for it
            if not path.exists():
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                with open(tmp, "w", encoding="utf-8") as f:
                    for doc in builtin_documents():
                        f.write(json.dumps({"text": doc}) + "\n")
                os.replace(tmp, path)  # atomic: a half-written corpus is never used
    return path


def resolve_text_files(paths: list[str]) -> list[str]:
    """Expand globs and check each file is present, non-empty UTF-8 text (one error line otherwise)."""
    files: list[str] = []
    for pattern in paths:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise UserError("data.paths", f"entry {pattern!r} matches no file", "check the path (globs are allowed)")
        files += matches
    for f in files:
        if os.path.isdir(f):
            raise UserError("data.paths", f"entry {f!r} is a directory", f"use a glob such as {f}/*.txt")
        if os.path.getsize(f) == 0:
            raise UserError("data.paths", f"file {f!r} is empty", "remove it from data.paths")
        with open(f, "rb") as fh:
            head = fh.read(1 << 16)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            # A multi-byte character cut at the end of the sample is fine; anything earlier is not text.
            if e.start < len(head) - 4 or b"\x00" in head:
                raise UserError("data.paths", f"file {f!r} is not UTF-8 text", "convert it to UTF-8 or remove it") from None
        if b"\x00" in head:
            raise UserError("data.paths", f"file {f!r} looks binary (NUL bytes)", "pass text files only")
    return files
