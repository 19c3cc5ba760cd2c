"""Shared by the command-line tests: the single-process reference runs."""

from __future__ import annotations

import pytest

from .test_parallel_cli import NO_CHECKPOINT, STEPS, final_weights
from .test_train_cli import read_metrics, train_ok


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir):
    """The single-process run of each model with our engine (computed once per test session)."""
    runs = {}

    def get(model):
        if model not in runs:
            run = tmp_path_factory.mktemp(f"ref-{model}")
            train_ok([f"model={model}", *STEPS, *NO_CHECKPOINT, f"hydra.run.dir={run}"], cache_dir)
            runs[model] = (*read_metrics(run), final_weights(run))
        return runs[model]

    return get
