"""Shared test set-up: one thread per process, an isolated cache, nothing from the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqpar.configs import CONFIG_DIR  # noqa: F401 - the packaged configs, for the tests

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable otherwise): the multi-process runs start at once on every worker and the quick
    tests fill the gaps after them, instead of one long run being left alone at the end of the session."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def shared_tmp(tmp_path_factory) -> Path:
    """A temporary folder all of this session's test processes (xdist workers) share."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (built-in corpus, tokenizers, datasets) for the whole session and all its workers, outside the
    user's home (the cache is safe to share: a tokenizer is trained once, under a lock)."""
    path = Path(os.environ.get("SEQPAR_TEST_CACHE") or shared_tmp(tmp_path_factory) / "seqpar-cache")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["SEQPAR_CACHE"] = str(path)
    return path


def cli_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SEQPAR_CACHE=str(cache_dir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_train(args: list[str], cache_dir: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python train.py <args>` as a user would, from the repository root."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env={**cli_env(cache_dir), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
