"""Raw text for training goes through the prepare step too: into the cache, once, by one process.

`train.py data=builtin|text_files|hf_dataset` trains on a prepared dataset in `<cache>/prepared/<key>/`, where the
key digests what decides its contents (the source's fingerprint, the tokenizer settings or the tokenizer
directory's files, the split, the shard size, this format). The first process to need it prepares it under a file
lock; every other process (the other local ranks, another job on a shared cache) waits on that lock with a message
and then reads the finished dataset: no process waits in a collective while text is tokenized. A process that
dies while preparing releases the lock, and the next one continues its prepare from the finished shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from seqpar.config import Config
from seqpar.data.corpus import cache_root
from seqpar.data.prepared.format import MANIFEST
from seqpar.data.prepared.writer import prepare_dataset, settings


def _tokenizer_files(path: str) -> list:
    files = sorted(p for p in Path(path).iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_path(cfg: Config) -> Path:
    """Where the raw source of `cfg` is prepared."""
    key = [settings(cfg), _tokenizer_files(cfg.data.tokenizer) if cfg.data.tokenizer else None]
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(cfg.data) / "prepared" / f"{cfg.model.arch}-{digest}"


def prepared_in_cache(cfg: Config) -> Path:
    """The prepared dataset of `cfg`'s raw source, prepared here first if no process has done it yet."""
    from filelock import FileLock, Timeout

    root = cache_path(cfg)
    if (root / MANIFEST).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{root}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process to finish preparing {root} (it holds {lock.lock_file})", file=sys.stderr,
              flush=True)
        lock.acquire()
    try:
        if not (root / MANIFEST).is_file():
            print(f"preparing {cfg.data.source} data into {root} (pid {os.getpid()})", file=sys.stderr, flush=True)
            prepare_dataset(cfg, root)
    finally:
        lock.release()
    return root
