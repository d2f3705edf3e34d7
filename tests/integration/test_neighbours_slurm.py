"""`status` and `list` of a job that has left the controller, on the bundled cluster, whose SLURM
has no accounting storage: a real `sacct` fails there, and `status` says so beside today's
"gone". The controller keeps ended jobs for MinJobAge (an hour), so the job here is one it never
had: scontrol answers "Invalid job id" for both alike.
"""

from __future__ import annotations

import subprocess
import sys

from bionemo import rundir
from launchers import config, record, runs

UNKNOWN_JOB = "67000001"  # never allocated by the bundled cluster (ids count up from 1)


def test_status_of_a_job_gone_without_accounting(tmp_path, slurm_cluster):
    sacct = slurm_cluster.run(["sacct", "-j", UNKNOWN_JOB, "-X", "-n", "-P"])
    assert sacct.returncode != 0  # the premise: this cluster keeps no accounting
    run = tmp_path / "esm2" / "gone"
    (run / rundir.LOGS).mkdir(parents=True)
    resolved = config.resolve(model="esm2_8m", cluster="local")
    (run / rundir.CONFIG).write_text(config.dump(resolved.config))
    record.create(run, backend="sbatch", cluster="local", policy={})
    record.add_job(run, UNKNOWN_JOB, "submit")

    out = subprocess.run(
        [sys.executable, "-m", "launchers", "status", str(run)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    state = next(line for line in out.stdout.splitlines() if line.startswith("state"))
    said = sacct.stderr.strip().splitlines()[-1]  # "Slurm accounting storage is disabled"
    assert state == (
        f"state     job {UNKNOWN_JOB}: {runs.GONE} (ended a while ago); "
        f"no accounting (sacct: {said})"
    )

    out = subprocess.run(
        [sys.executable, "-m", "launchers", "list", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[1:5] == ["esm2/gone", "sbatch", "failed", "-"]


def test_list_follows_a_real_job_until_cancelled(tmp_path, slurm_cluster):
    run = tmp_path / "esm2" / "live"
    (run / rundir.LOGS).mkdir(parents=True)
    resolved = config.resolve(model="esm2_8m", cluster="local")
    (run / rundir.CONFIG).write_text(config.dump(resolved.config))
    record.create(run, backend="sbatch", cluster="local", policy={})
    job = slurm_cluster.sbatch("--wrap", "sleep 300", "-o", str(run / rundir.LOGS / "%j.out"))
    record.add_job(run, str(job), "submit")

    def listed() -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "launchers", "list", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()[1].split()[1:5]

    try:
        if listed()[2] == "queued":  # scontrol said PENDING (other tests' jobs may hold nodes)
            slurm_cluster.wait_job(job, "RUNNING", timeout=60)
        assert listed() == ["esm2/live", "sbatch", "running", "-"]
        done = subprocess.run(
            [sys.executable, "-m", "launchers", "cancel", str(run)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        slurm_cluster.wait_job(job, "CANCELLED", timeout=30)
        assert listed() == ["esm2/live", "sbatch", "stopped", "-"]
    finally:
        slurm_cluster.cancel(job)
