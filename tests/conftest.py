"""Shared pytest fixtures: the repository root and the bundled SLURM cluster.

Tests under tests/integration are marked `cluster` automatically. The `slurm_cluster` fixture starts
the bundled cluster once per session (launchers.cluster.up(); idempotent, so an already running
cluster is reused) and FAILS the requesting test when it cannot start -- it never skips.

`make test` runs the suite on pytest-xdist workers (`-n N --dist loadscope`): every test that uses
the cluster is in ONE scope (`pytest_xdist_make_scheduler` below), so one worker owns the cluster,
its session fixtures and the shared slow runs, and spends its time waiting on SLURM while the other
workers run the CPU-bound tests, a module at a time. See `pytest_collection_modifyitems` for the
order.
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

# Under xdist the tests that use the bundled cluster are ONE scope, run by one worker: the
# integration tests and these modules (each has a test that submits held jobs; a module stays
# whole, so its module fixtures are built once). A test outside them that uses the cluster is a
# collection error: another worker's `cluster.up()` could resume a node that a node-failure test
# has just set DOWN.
CLUSTER_MODULES_OUTSIDE_INTEGRATION = ("tests/test_cli.py", "tests/test_install.py")
# The order of the cluster worker's modules. First those that do not wait for the shared slow runs
# (submitted as the first integration test starts), then the modules that check the slow runs,
# then the two modules whose node-failure tests need whole nodes (--exclusive): by then the slow
# runs have ended. A module not listed goes after the listed ones.
CLUSTER_MODULE_ORDER = (
    "test_recipe_slurm.py",  # an integration module first: it submits the slow runs
    "test_install.py",
    "test_cli.py",
    "test_injection_slurm.py",
    "test_neighbours_slurm.py",
    "test_finetune_slurm.py",
    "test_disk_full.py",
    "test_sweep_slurm.py",
    "test_rank_faults.py",
    "test_hung_rank.py",
    "test_submitit.py",
    "test_nemo_run.py",
    "test_geneformer_slurm.py",
    "test_sbatch.py",
    "test_cluster.py",
)
# The other workers' modules start with the longest, so that the last ones to run are short:
# seconds per module measured on the 2-core CI machine (two workers); unlisted ones come after.
MODULE_SECONDS = {
    "test_fsdp.py": 152,
    "test_compile_cache.py": 106,
    "test_esm2_model.py": 98,
    "test_resume.py": 90,
    "test_async_checkpoint.py": 90,
    "test_finetune.py": 82,
    "test_sweep.py": 77,
    "test_geneformer.py": 70,
    "test_fp8.py": 53,
    "test_checkpoint_integrity.py": 51,
    "test_hf.py": 44,
    "test_neighbours.py": 42,
    "test_sweep_strategy.py": 42,
    "test_plugin.py": 42,
    "test_megatron_engine.py": 26,
    "test_local_backend.py": 23,
    "test_wandb.py": 21,
    "test_watchdog.py": 21,
    "test_restart_cost_script.py": 21,
    "test_recipe.py": 20,
    "test_injection.py": 8,
    "test_profile_step.py": 6,
    "test_data_scale.py": 6,
}


def _is_cluster_test(item) -> bool:
    return INTEGRATION_DIR in Path(item.path).resolve().parents


def cluster_scope(nodeid: str) -> bool:
    """Whether a test (by its node id) belongs to the cluster worker's scope under xdist."""
    path = nodeid.split("::")[0]
    return path.startswith("tests/integration/") or path in CLUSTER_MODULES_OUTSIDE_INTEGRATION


def xdist_worker() -> bool:
    return bool(os.environ.get("PYTEST_XDIST_WORKER"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_cluster_test(item):
            item.add_marker(pytest.mark.cluster)
    if not xdist_worker():
        # One process: cluster tests last (stable order otherwise): the shared time-limited runs,
        # submitted before the first test (below), spend their minutes of SLURM time (mostly
        # sleeping steps and the time limit itself) while the other tests run.
        items.sort(key=_is_cluster_test)
        return
    strays = [
        item.nodeid
        for item in items
        if "slurm_cluster" in item.fixturenames and not cluster_scope(item.nodeid)
    ]
    if strays:
        raise pytest.UsageError(
            f"{strays}: tests that use the bundled cluster must be under tests/integration or in "
            "tests/conftest.py's CLUSTER_MODULES_OUTSIDE_INTEGRATION (one xdist worker owns it)"
        )
    # xdist (make test: -n N --dist loadscope --no-loadscope-reorder and the scheduler below): the
    # scopes are handed out in this order, the cluster scope first, so that its worker starts on
    # it at once; each module stays contiguous (its module fixtures are built once).
    modules = [Path(item.path).name for item in items]
    first_seen = {name: i for i, name in reversed(list(enumerate(modules)))}

    def key(pair):
        index, item = pair
        name = modules[index]
        if cluster_scope(item.nodeid):
            rank = CLUSTER_MODULE_ORDER.index(name) if name in CLUSTER_MODULE_ORDER else 99
            return (0, rank, first_seen[name], index)
        return (1, -MODULE_SECONDS.get(name, 0), first_seen[name], index)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadscope with one scope for every cluster test (cluster_scope) and one per module
    for the others."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ClusterScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "cluster" if cluster_scope(nodeid) else nodeid.split("::")[0]

    return ClusterScopeScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def _slow_cluster_runs_first(request, tmp_path_factory):
    # Under xdist only the worker that runs the cluster group submits them, at its first
    # integration test (tests/integration/conftest.py), which is its first test.
    if not xdist_worker():
        from tests.integration._runs import submit_slow_runs

        submit_slow_runs(request, tmp_path_factory)
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
