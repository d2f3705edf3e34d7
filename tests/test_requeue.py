"""The requeue decision's newer outcomes (disk full, hung, rejected checkpoint) and the decision
step on a full disk: `python -m launchers.requeue` as a real process with submission.json's
filesystem really full (a small tmpfs; root only, as for the bundled cluster)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bionemo import rundir
from launchers import cli, record, requeue

REPO = Path(__file__).resolve().parents[1]
POLICY = {"max_restarts": 3, "requeue_exit_code": 75, "oom_exit_code": 12, "time_limit_s": 600}
HUNG = {
    "event": "hung",
    "rank": 0,
    "suspect_rank": 1,
    "suspect_host": "node2",
    "step": 12,
    "waited_s": 31.0,
    "limit_s": 30.0,
    "job_id": "7",
    "restart": 0,
}


def decide(exit_code, latest, history=(), restarts=0, events=(), **kw):
    return requeue.decide(
        finished=False,
        exit_code=exit_code,
        latest_step=latest,
        restarts=restarts,
        policy=POLICY,
        history=list(history),
        events=list(events),
        **kw,
    )


# ------------------------------------------------------------------------------------ decide()


def test_hung_is_retried_once_and_records_the_suspect_node():
    first = decide(rundir.HUNG_EXIT_CODE, 10, events=[HUNG])
    assert first["outcome"] == "hung" and first["decision"] == "requeue", first
    assert first["suspect_host"] == "node2" and first["suspect_rank"] == 1
    assert "rank 1 on node2" in first["reason"] and "31.0 s (limit 30.0 s)" in first["reason"]
    # srun may report the rank it killed after its peer's watchdog fired: the event says hung
    assert decide(137, 10, events=[HUNG])["outcome"] == "hung"
    # exit 124 without an event (the record was lost): still hung, node unknown
    bare = decide(rundir.HUNG_EXIT_CODE, 10)
    assert bare["outcome"] == "hung" and bare["decision"] == "requeue" and not bare["suspect_host"]


def test_hung_or_crashed_twice_at_the_same_step_is_a_loop():
    hung = {**decide(rundir.HUNG_EXIT_CODE, 10, events=[HUNG]), "latest_step": 10, "exit_code": 124}
    d = decide(rundir.HUNG_EXIT_CODE, 10, [hung], events=[HUNG])
    assert d["decision"] == "stop" and "hung twice at step 10" in d["reason"], d
    assert "node2, node2" in d["reason"]
    crashed = {**decide(1, 10), "latest_step": 10, "exit_code": 1}
    d = decide(rundir.HUNG_EXIT_CODE, 10, [crashed], events=[HUNG])
    assert d["decision"] == "stop" and "crashed then hung at step 10" in d["reason"], d
    d = decide(1, 10, [hung])
    assert d["decision"] == "stop" and "hung then crashed at step 10" in d["reason"], d
    # progress since the hang: not a loop; the restart limit still applies
    assert decide(rundir.HUNG_EXIT_CODE, 20, [hung], events=[HUNG])["decision"] == "requeue"
    d = decide(rundir.HUNG_EXIT_CODE, 20, [hung], restarts=3, events=[HUNG])
    assert d["decision"] == "stop" and "max_restarts" in d["reason"] and d["outcome"] == "hung"


def test_disk_full_stops_with_filesystem_and_step():
    event = {"event": "disk_full", "step": 40, "filesystem": "/scratch", "path": "/x"}
    d = decide(rundir.DISK_FULL_EXIT_CODE, 30, events=[event])
    assert d["outcome"] == "disk_full" and d["decision"] == "stop", d
    assert d["reason"].startswith("disk full: no space left on /scratch while saving step 40")
    assert "free space, then `resume`" in d["reason"]
    # the event alone (torchrun turns 28 into 1), and exit 28 alone (the event was lost)
    assert decide(1, 30, events=[event])["outcome"] == "disk_full"
    d = decide(rundir.DISK_FULL_EXIT_CODE, 30)
    assert d["decision"] == "stop" and "the run directory's filesystem" in d["reason"]
    # before the restart limit: the more useful reason
    assert decide(28, 30, restarts=3, events=[event])["outcome"] == "disk_full"


def test_rejected_checkpoint_is_a_note_only():
    rejected = {
        "event": "checkpoint_rejected",
        "step": 40,
        "file": "__0_0.distcp",
        "reason": "checksum mismatch",
    }
    d = decide(75, 50, events=[rejected])
    assert d["decision"] == "requeue" and d["outcome"] == "stopped"
    assert "checkpoint step 40 was rejected (__0_0.distcp: checksum mismatch)" in d["reason"]


def test_attempt_events_are_this_job_and_restart():
    events = [
        {**HUNG, "restart": 0},
        {**HUNG, "restart": 1},
        {**HUNG, "job_id": "8"},
        {**HUNG, "job_id": None, "time": "2000-01-01T00:00:00Z"},
    ]
    assert requeue.attempt_events(events, "7", 1) == [events[1]]
    assert requeue.attempt_events(events, None, 0, since=0) == [events[3]]
    assert requeue.attempt_events(events, None, 0, since=1e10) == []


def test_explain_exit():
    assert requeue.explain_exit(28).startswith("28 (disk full")
    assert requeue.explain_exit(124).startswith("124 (hung")
    assert requeue.explain_exit(137) == "137 (killed by SIGKILL)"


# ------------------------------------------------------------------------------------ full disk


@contextlib.contextmanager
def small_filesystem(kib: int):
    """A tmpfs of `kib` KiB, unmounted at the end whatever happens."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (as the bundled cluster does)", pytrace=False)
    mnt = Path(tempfile.mkdtemp(prefix="bionemo-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def fill(mnt: Path) -> None:
    with open(mnt / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    assert os.statvfs(mnt).f_bavail == 0


@pytest.fixture
def full_run(tmp_path):
    """A run directory whose filesystem is full after a disk_full event of job 5 restart 0,
    plus a logging `scontrol` on PATH (this test has no SLURM)."""
    with small_filesystem(256) as mnt:
        run_dir = mnt / "run"
        run_dir.mkdir()
        record.create(run_dir, backend="sbatch", cluster="local", policy=POLICY)
        rundir.step_dir(run_dir, 20).mkdir(parents=True)
        (rundir.step_dir(run_dir, 20) / rundir.COMPLETE).write_text("20\n")
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        calls = tmp_path / "calls"
        (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $*" >> {calls}\n')
        (bin_dir / "scontrol").chmod(0o755)
        env = {
            **os.environ,
            "SLURM_JOB_ID": "5",
            "SLURM_RESTART_COUNT": "0",
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
        }
        yield run_dir, env, calls


def decide_in_process(run_dir: Path, env: dict, code: int, stdout=subprocess.PIPE):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers.requeue",
            str(run_dir),
            "--exit-code",
            str(code),
            "--elapsed",
            "30",
        ],
        cwd=REPO,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )


def test_disk_full_decision_survives_a_full_disk(full_run, capsys, monkeypatch):
    run_dir, env, calls = full_run
    monkeypatch.setenv("SLURM_JOB_ID", "5")  # the trainer's event of this attempt
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    rundir.append_event(run_dir, "disk_full", step=30, filesystem=str(run_dir.parent), path="x")
    fill(run_dir.parent)
    before = record.path(run_dir).read_text()

    out = decide_in_process(run_dir, env, rundir.DISK_FULL_EXIT_CODE)
    assert out.returncode == rundir.DISK_FULL_EXIT_CODE, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (
        f"[launcher] decision: stop -- disk full: no space left on "
        f"{run_dir.parent} while saving step 30 (exit 28; newest complete "
        "checkpoint: step 20); a requeue would fail the same way; free space, "
        "then `resume`"
    ), out.stdout
    assert "could not record the decision" in lines[1] and "No space left" in lines[1], lines
    assert "Traceback" not in out.stderr, out.stderr
    assert record.path(run_dir).read_text() == before  # untouched, not half-written
    assert not calls.exists()  # a stop requeues nothing

    # status says why, from the batch log (what the batch script's stdout is)
    (run_dir / rundir.LOGS).mkdir(exist_ok=True)
    with contextlib.suppress(OSError):
        (run_dir.parent / "filler").unlink()
    (run_dir / rundir.LOGS / "slurm-5.out").write_text(out.stdout)
    (run_dir / rundir.CONFIG).write_text("job: {backend: sbatch}\n")
    assert cli.cmd_status(_Args(str(run_dir))) == 0
    shown = capsys.readouterr().out
    assert "decision  stop -- disk full: no space left on" in shown, shown
    assert "could not record the decision" in shown
    assert "disk_full step 30 on" in shown


def test_requeue_decision_still_requeues_on_a_full_disk(full_run):
    run_dir, env, calls = full_run
    fill(run_dir.parent)
    out = decide_in_process(run_dir, env, rundir.REQUEUE_EXIT_CODE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("[launcher] decision: requeue -- saved on the warning signal")
    assert "could not record the decision" in out.stdout
    assert calls.read_text().splitlines() == ["scontrol requeue 5"]


def test_decision_reaches_the_record_when_the_batch_log_is_full(full_run):
    """stdout on a full device (the batch log): no exit 120 from a failed flush, the decision
    goes to stderr and into submission.json."""
    run_dir, env, calls = full_run
    with open("/dev/full", "w") as full:
        out = decide_in_process(run_dir, env, 1, stdout=full)
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("[launcher] decision: requeue -- crashed (exit 1)"), out.stderr
    assert record.load(run_dir)["attempts"][-1]["outcome"] == "crashed"
    assert calls.read_text().splitlines() == ["scontrol requeue 5"]


class _Args:
    def __init__(self, run):
        self.run = run


def test_out_of_memory_event_wins_over_the_peer_kill_code():
    # one rank ran out of memory (exit 12, `oom` event); srun --kill-on-bad-exit killed its peer,
    # so the step's exit code is the peer's 143: the event keeps the verdict "out of memory"
    d = decide(143, 10, events=[{"event": "oom", "rank": 1, "detail": "CUDA out of memory"}])
    assert d["outcome"] == "oom" and d["decision"] == "stop", d
    assert decide(143, 10)["outcome"] == "crashed"


def test_no_intact_checkpoint_stops_at_once():
    ev = {"event": "no_intact_checkpoint", "rejected": ["step-00000008.corrupt"]}
    d = decide(1, None, events=[ev])
    assert d["decision"] == "stop" and d["outcome"] == "no_checkpoint", d
    assert "step-00000008.corrupt" in d["reason"] and "refuses to train from step 0" in d["reason"]


def test_a_stop_reported_as_a_kill_is_still_a_stop():
    # rank 1 exited 75 first, srun --kill-on-bad-exit terminated rank 0 after it had saved: the
    # step says 143, rank 0's `stopped` event (at the latest checkpoint) says what happened
    ev = {"event": "stopped", "step": 24, "signal": "SIGUSR2"}
    d = decide(143, 24, events=[ev])
    assert d["outcome"] == "stopped" and d["decision"] == "requeue", d
    assert decide(143, 20, events=[ev])["outcome"] == "crashed"  # its checkpoint is not the latest
