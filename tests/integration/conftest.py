"""Under pytest-xdist (make test), the worker that runs the cluster tests submits the shared slow
runs (tests/integration/_runs.py) at its first integration test, which is its first test (the
cluster group is scheduled first; tests/conftest.py), as `_slow_cluster_runs_first` does at the
start of a session in one process."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _slow_cluster_runs_at_the_first_cluster_test(request, tmp_path_factory):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from tests.integration._runs import submit_slow_runs

        submit_slow_runs(request, tmp_path_factory)
    yield
