"""Shared by the command-line tests: the single-process reference runs."""

from __future__ import annotations

import pytest

from .test_parallel_cli import NO_CHECKPOINT, STEPS, final_weights, merged
from .test_train_cli import read_metrics, train_ok


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir):
    """The single-process run of each model with our engine (run once per test session: the first worker that
    needs it runs it under a lock, the others read its files)."""
    from filelock import FileLock

    from ..conftest import shared_tmp

    runs = {}

    def get(model, *overrides):
        """The run of `model` with STEPS, and `overrides` (model.* keys) replacing their values."""
        key = (model, *overrides)
        if key not in runs:
            run = shared_tmp(tmp_path_factory) / "-".join(["reference", model, *(o.replace("=", "_") for o in overrides)])
            with FileLock(f"{run}.lock"):
                if not (run / "final_model" / "model.safetensors").is_file():
                    train_ok([f"model={model}", *merged(STEPS, overrides), *NO_CHECKPOINT, f"hydra.run.dir={run}"],
                             cache_dir)
            runs[key] = (*read_metrics(run), final_weights(run))
        return runs[key]

    return get
