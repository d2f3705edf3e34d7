"""The bundled SLURM cluster runs real multi-node jobs, delivers --signal, and requeues on failure.

These tests submit real jobs to the local cluster (launchers/cluster.py); together they take well
under two minutes, most of it waiting for slurmctld's 30 s time-limit tick in the --signal test.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from launchers import cluster


def wait_for_text(path: Path, pattern: str, timeout: float = 30) -> re.Match:
    """Poll a job's output file until `pattern` matches its text."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        match = re.search(pattern, text, re.M)
        if match:
            return match
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} not found in {path} after {timeout}s:\n{text}")


def hostnames(slurm_cluster, nodelist: str) -> list[str]:
    out = slurm_cluster.run(["scontrol", "show", "hostnames", nodelist], check=True)
    return out.stdout.split()


@pytest.fixture
def jobs(slurm_cluster):
    """Collects submitted job ids and cancels whatever is still alive at the end of the test."""
    ids: list[int] = []
    yield ids
    for job_id in ids:
        slurm_cluster.cancel(job_id)


def test_up_is_idempotent(slurm_cluster):
    t0 = time.monotonic()
    cluster.up()
    cluster.up()
    assert time.monotonic() - t0 < 10
    assert cluster.is_up()
    states = cluster.node_states()
    assert sorted(states) == sorted(cluster.NODES)
    assert all(cluster.node_usable(s) for s in states.values()), states
    assert slurm_cluster.env["SLURM_CONF"] == str(cluster.cluster_dir() / "etc" / "slurm.conf")


def test_two_node_srun(slurm_cluster, jobs, tmp_path):
    out = tmp_path / "out.txt"
    script = "#!/bin/bash\nsrun bash -c 'echo task $SLURM_PROCID $SLURMD_NODENAME $(hostname)'\n"
    job_id = slurm_cluster.sbatch(
        "-N", "2", "--ntasks-per-node=1", "-c", "2", "-o", str(out), script=script
    )
    jobs.append(job_id)
    record = slurm_cluster.wait_job(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=30)
    assert record["JobState"] == "COMPLETED", (record, out.read_text() if out.exists() else "")
    tasks = dict(re.findall(r"^task (\d+) (\S+) \S+$", out.read_text(), re.M))
    assert set(tasks) == {"0", "1"}, out.read_text()
    assert len(set(tasks.values())) == 2 and set(tasks.values()) <= set(slurm_cluster.nodes), tasks
    assert set(tasks.values()) == set(hostnames(slurm_cluster, record["NodeList"]))


def test_signal_reaches_trapped_task(slurm_cluster, jobs, tmp_path):
    # slurmctld checks --signal deadlines on its 30 s background tick, so with a 1-minute limit and
    # USR2@50 the signal arrives 10-40 s after the start, always before the limit.
    out = tmp_path / "out.txt"
    script = (
        "#!/bin/bash\n"
        'srun bash -c \'start=$SECONDS; trap "echo USR2 after \\$((SECONDS - start))s on $SLURMD_NODENAME; exit 0" USR2;'
        " echo ready; while true; do sleep 0.5; done'\n"
    )
    job_id = slurm_cluster.sbatch(
        "-N", "1", "--time=1", "--signal=USR2@50", "-o", str(out), script=script
    )
    jobs.append(job_id)
    wait_for_text(out, r"^ready$", timeout=30)
    match = wait_for_text(out, r"^USR2 after (\d+)s on (\S+)$", timeout=60)
    assert int(match.group(1)) < 55
    record = slurm_cluster.wait_job(
        job_id, {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}, timeout=30
    )
    assert record["JobState"] == "COMPLETED", record


REQUEUE_SCRIPT = (
    "#!/bin/bash\n"
    'echo "run restart=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST"\n'
    "srun bash -c 'echo step on $SLURMD_NODENAME; exec sleep 300'\n"
)


def test_scontrol_requeue_and_release(slurm_cluster, jobs, tmp_path):
    out = tmp_path / "out.txt"
    job_id = slurm_cluster.sbatch(
        "-N", "1", "--requeue", "--open-mode=append", "-o", str(out), script=REQUEUE_SCRIPT
    )
    jobs.append(job_id)
    slurm_cluster.wait_job(job_id, {"RUNNING"}, timeout=30)
    wait_for_text(out, r"^step on ", timeout=30)

    slurm_cluster.run(["scontrol", "requeue", str(job_id)], check=True)
    record = slurm_cluster.wait_job(job_id, {"PENDING"}, timeout=30)
    assert int(record["Restarts"]) == 1
    slurm_cluster.release(job_id)  # skip the ~120 s hold SLURM puts on requeued jobs
    slurm_cluster.wait_job(job_id, {"RUNNING"}, timeout=30)
    wait_for_text(out, r"^run restart=1 ", timeout=30)


def test_node_failure_requeues_job_elsewhere(slurm_cluster, jobs, tmp_path):
    out = tmp_path / "out.txt"
    # --exclusive: the failed node hosts nothing but this job (other tests may share the cluster).
    job_id = slurm_cluster.sbatch(
        "-N",
        "2",
        "--ntasks-per-node=1",
        "--exclusive",
        "--requeue",
        "--open-mode=append",
        "-o",
        str(out),
        script=REQUEUE_SCRIPT,
    )
    jobs.append(job_id)
    record = slurm_cluster.wait_job(job_id, {"RUNNING"}, timeout=30)
    first_nodes = hostnames(slurm_cluster, record["NodeList"])
    victim = first_nodes[-1]
    wait_for_text(out, r"^step on ", timeout=30)
    try:
        slurm_cluster.run(
            ["scontrol", "update", f"nodename={victim}", "state=down", "reason=test-node-failure"],
            check=True,
        )
        record = slurm_cluster.wait_job(job_id, {"PENDING"}, timeout=30)
        assert int(record["Restarts"]) == 1, record
        assert cluster.node_states()[victim].startswith("DOWN"), cluster.node_states()

        slurm_cluster.release(job_id)
        record = slurm_cluster.wait_job(job_id, {"RUNNING"}, timeout=30)
        second_nodes = hostnames(slurm_cluster, record["NodeList"])
        assert victim not in second_nodes and len(second_nodes) == 2, (first_nodes, second_nodes)
        wait_for_text(out, r"^run restart=1 ", timeout=30)
        slurm_cluster.cancel(job_id)
    finally:
        cluster.reset_node(victim)
    assert cluster.node_usable(cluster.node_states()[victim])
