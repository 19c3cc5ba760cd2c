"""The test SLURM cluster, started once for the session (or the reason it cannot be, for skipping)."""

from __future__ import annotations

import pytest

from .slurm import LocalSlurm, Unavailable


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    try:
        cluster = LocalSlurm.start(tmp_path_factory.mktemp("slurm"))
    except Unavailable as e:
        pytest.skip(f"no local SLURM cluster: {e}")
    yield cluster
    cluster.stop()
