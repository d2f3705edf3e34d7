"""A full disk, for real: the run directory on a tmpfs that holds the first checkpoint but not the
second. The save fails on both ranks alike, the older checkpoint stays intact, the trainer says
"no space left", exits 28, and the requeue step stops the run with the reason, which `status`
shows. (The decision step on a disk that stays full: tests/test_requeue.py.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from bionemo import rundir
from launchers import record
from tests.integration._runs import logs, runs, wait_for  # noqa: F401 -- runs: fixture

FIRST, SECOND = 3, 6  # the checkpoint that fits, the one that does not


def digests(step_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(step_dir.iterdir())}


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs, large until the test shrinks it (`mount -o remount,size=`); unmounted at the end."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_stops_with_the_reason_and_keeps_the_older_checkpoint(runs, small_fs):
    out = runs.cli(
        "submit",
        "--backend",
        "sbatch",
        "--model",
        "esm2_8m",
        "--cluster",
        "local",
        "--nodes",
        "2",
        f"cluster.runs_root={small_fs}",
        "job.experiment=disk",
        "job.run=full",
        *runs.data["esm2_8m"],
        "max_steps=30",
        f"trainer.checkpoint.every_steps={FIRST}",
        "cluster.env.BIONEMO_STEP_SLEEP=1",
    )  # ~3 s between saves to shrink the disk
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = small_fs / "disk" / "full"
    job_id = record.job_ids(record.load(run_dir))[-1]
    runs.releaser.jobs.add(job_id)  # cancelled at the end of the session if still alive

    # Size the filesystem from what a checkpoint of this run really takes: what is used now
    # plus half a checkpoint, so the logs still fit and the next save does not.
    wait_for(lambda: rundir.latest_complete_step(run_dir), 180, "the first checkpoint", run_dir)
    first = rundir.step_dir(run_dir, FIRST)
    assert rundir.latest_complete_step(run_dir) == FIRST, logs(run_dir)
    before = digests(first)
    ckpt = sum(p.stat().st_size for p in first.iterdir())
    st = os.statvfs(small_fs)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    size_k = (used + ckpt // 2) // 1024
    subprocess.run(["mount", "-o", f"remount,size={size_k}k", str(small_fs)], check=True)

    rec = runs.wait_final(job_id, timeout=180)
    assert rec["JobState"] == "FAILED" and rec["ExitCode"].startswith("28:"), (rec, logs(run_dir))
    # the older checkpoint is intact and is still the newest; the failed one left nothing
    steps, incomplete = rundir.checkpoint_steps(run_dir)
    assert steps == [FIRST] and incomplete == [], (steps, incomplete, logs(run_dir))
    assert digests(first) == before
    # the trainer said so, on both ranks, naming the folder and the step
    trainer_log = "\n".join(p.read_text() for p in (run_dir / rundir.LOGS).glob("train-*.log"))
    failed = [line for line in trainer_log.splitlines() if "no space left on device" in line]
    assert len(failed) == 2 and f"saving step {SECOND} failed" in failed[0], trainer_log[-3000:]
    assert rundir.step_dir(run_dir, SECOND).name + ".partial" in failed[0]
    (event,) = [e for e in rundir.read_events(run_dir) if e["event"] == "disk_full"]
    assert event["step"] == SECOND and event["filesystem"] == str(small_fs)
    assert event["job_id"] == job_id
    # the decision: printed, recorded, and shown by status. srun's exit code may be the peer it
    # killed (143) once the first rank exited 28; the event of this attempt says disk full.
    reason = f"disk full: no space left on {small_fs} while saving step {SECOND}"
    batch = (run_dir / rundir.LOGS / f"slurm-{job_id}.out").read_text()
    assert f"[launcher] decision: stop -- {reason}" in batch, batch
    last = record.load(run_dir)["attempts"][-1]
    assert last["outcome"] == "disk_full" and last["decision"] == "stop", last
    assert last["reason"].startswith(reason), last
    status = runs.cli("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert f"reason    {reason}" in status.stdout, status.stdout
    assert f"disk_full step {SECOND} on" in status.stdout, status.stdout
