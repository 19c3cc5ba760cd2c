"""Shared test set-up: one thread per process, an isolated cache, nothing from the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (built-in corpus, tokenizers, datasets) for the whole session, outside the user's home."""
    path = Path(os.environ.get("SEQPAR_TEST_CACHE") or tmp_path_factory.mktemp("seqpar-cache"))
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
