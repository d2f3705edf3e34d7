"""Shared pytest fixtures: the repository root and the bundled SLURM cluster.

Tests under tests/integration are marked `cluster` automatically. The `slurm_cluster` fixture starts
the bundled cluster once per session (launchers.cluster.up(); idempotent, so an already running
cluster is reused) and FAILS the requesting test when it cannot start -- it never skips.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
INTEGRATION_DIR = REPO_ROOT / "tests" / "integration"


# Modules whose checks wait for the shared time-limited runs (tests/integration/_runs.py).
SLOW_RUN_MODULES = {
    "test_sbatch.py",
    "test_submitit.py",
    "test_nemo_run.py",
    "test_geneformer_slurm.py",
}


def _is_cluster_test(item) -> bool:
    return INTEGRATION_DIR in Path(item.path).resolve().parents


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_cluster_test(item):
            item.add_marker(pytest.mark.cluster)
    # Cluster tests last (stable order otherwise): the shared time-limited runs, submitted
    # before the first test (below), spend their minutes of SLURM time (mostly sleeping steps
    # and the time limit itself) while the other tests run, not while their checks wait.
    items.sort(key=_is_cluster_test)


@pytest.fixture(scope="session", autouse=True)
def _slow_cluster_runs_first(request, tmp_path_factory):
    if any(Path(item.path).name in SLOW_RUN_MODULES for item in request.session.items):
        try:
            slurm = request.getfixturevalue("slurm_cluster")
        except BaseException:  # noqa: BLE001 -- the cluster tests fail on it themselves
            slurm = None
        if slurm is not None:
            from tests.integration._runs import shared, slow_runs

            slow_runs(shared(slurm, tmp_path_factory, request))
    yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Parse one `scontrol show ... -o` line into a dict (values may contain spaces, e.g. Reason=)."""
    record: dict[str, str] = {}
    # A key is a word followed by '='; its value runs until the next ' Key=' or the end of line.
    for m in re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|$)", line.strip()):
        record.setdefault(m.group(1), m.group(2))
    return record


@dataclass
class SlurmCluster:
    """Handle on the running bundled cluster, handed to tests by the `slurm_cluster` fixture."""

    env: dict[str, str]
    nodes: tuple[str, ...]
    dir: Path
    partition: str = "debug"
    log_dir: Path = field(init=False)

    def __post_init__(self):
        self.log_dir = self.dir / "log"

    def run(
        self, cmd: list[str], check: bool = False, timeout: float = 60, **kw
    ) -> subprocess.CompletedProcess:
        """Run a command with the cluster's environment, capturing text output."""
        kw.setdefault("env", self.env)
        return subprocess.run(
            cmd, capture_output=True, text=True, check=check, timeout=timeout, **kw
        )

    def sbatch(self, *args: str, script: str | None = None, cwd: Path | str | None = None) -> int:
        """Submit a job (optionally a script given as text on stdin) and return its id."""
        out = self.run(["sbatch", "--parsable", *args], input=script, cwd=cwd)
        if out.returncode != 0:
            raise AssertionError(f"sbatch failed: {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o` as a dict ({} when the job is unknown)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        line = (
            out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
        )
        return parse_scontrol_record(line) if line else {}

    def wait_job(
        self, job_id: int | str, states, timeout: float = 60, poll: float = 0.5
    ) -> dict[str, str]:
        """Poll until the job's JobState is one of `states`; return the parsed record."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        record: dict[str, str] = {}
        while time.monotonic() < deadline:
            record = self.job(job_id)
            if record.get("JobState") in states:
                return record
            time.sleep(poll)
        raise AssertionError(
            f"job {job_id} not in {sorted(states)} after {timeout}s: JobState={record.get('JobState')} "
            f"Reason={record.get('Reason')} (logs: {self.log_dir})"
        )

    def release(self, job_id: int | str) -> None:
        """Make a requeued job eligible now instead of after SLURM's ~120 s requeue hold.

        Requeueing revokes the job's credential on its nodes with one-second resolution; a restart
        allocated within that same second is refused ("Job credential revoked") and the job FAILS.
        So the release waits until two seconds after the requeue (the job's new SubmitTime).
        """
        submitted = self.job(job_id).get("SubmitTime", "")
        with contextlib.suppress(ValueError):
            wait = time.mktime(time.strptime(submitted, "%Y-%m-%dT%H:%M:%S")) + 2 - time.time()
            if 0 < wait <= 5:
                time.sleep(wait)
        out = self.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"])
        if out.returncode != 0:
            raise AssertionError(f"release of job {job_id} failed: {out.stderr}")

    def cancel(self, job_id: int | str) -> None:
        self.run(["scancel", str(job_id)])


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    from launchers import cluster

    error = None
    try:
        cluster.up()
    except Exception as exc:  # noqa: BLE001 -- any failure to start is a test failure, never a skip
        error = f"bundled SLURM cluster could not start: {exc}"
    if error:
        pytest.fail(error, pytrace=False)
    return SlurmCluster(
        env={**os.environ, **cluster.slurm_env()},
        nodes=cluster.NODES,
        dir=cluster.cluster_dir(),
        partition=cluster.PARTITION,
    )
