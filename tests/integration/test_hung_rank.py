"""A hung rank on the bundled cluster (bionemo/watchdog.py): SIGSTOP one rank of a 2-node run.

The stopped rank cannot run its own watchdog; the other rank blocks in the next all-reduce and
its watchdog fires after trainer.train.watchdog_s: it dumps every thread's stack to its log,
records a "hung" event naming the stopped rank, and exits 124; srun ends the step
(--kill-on-bad-exit: the stopped rank would hold it forever), the job requeues, resumes from the
last complete checkpoint and ends bit-identical to the uninterrupted reference run (shared with
the other backend tests when they run in the same session)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

from bionemo import rundir
from bionemo.watchdog import heartbeat_path
from launchers import record
from tests.integration._runs import (
    TL_COMMON,
    TL_STEPS,
    assert_finished,  # noqa: F401
    assert_same_weights,
    logs,
    runs,
    wait_for,
)

WATCHDOG_S = 7  # 14x a step here (~0.5 s with the sleep below, more on a busy CI box)
HUNG = [
    *TL_COMMON,
    f"trainer.train.watchdog_s={WATCHDOG_S}",
    # 30 steps after the first checkpoint take >= 6 s: time to stop a rank mid-run
    "cluster.env.BIONEMO_STEP_SLEEP=0.2",
]


def _heartbeat(run_dir: Path, rank: int) -> dict:
    try:
        return json.loads(heartbeat_path(run_dir, rank).read_text())
    except (OSError, ValueError):
        return {}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").partition("=")[::2] for e in raw if e)


def _stop_rank_mid_step(run_dir: Path, job_id: str, rank: int) -> int:
    """SIGSTOP the rank's trainer (the bundled nodes are this host) while it trains, not saves;
    returns its pid."""

    def training():
        beat = _heartbeat(run_dir, rank)
        return beat if beat.get("phase") == "step" and beat.get("step", 0) > 10 else None

    wait_for(lambda: rundir.latest_complete_step(run_dir), 120, "a first checkpoint", run_dir)
    pid = wait_for(training, 60, f"rank {rank} training after the checkpoint", run_dir)["pid"]
    env = _environ(pid)
    assert (env.get("SLURM_PROCID"), env.get("SLURM_JOB_ID")) == (str(rank), job_id), env
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_a_stopped_rank_ends_the_job_which_resumes_exactly(runs, tmp_path):  # noqa: F811
    ref_dir, ref_job = (runs.slow or {}).get("ref") or runs.submit(
        "sbatch", "hung-reference", *TL_COMMON
    )
    run_dir, job_id = runs.submit("sbatch", "hung-rank", *HUNG)
    runs.slurm.wait_job(job_id, {"RUNNING"}, timeout=120)
    pid = _stop_rank_mid_step(run_dir, job_id, rank=1)
    stopped_at = time.monotonic()
    try:
        attempt = wait_for(
            lambda: record.load(run_dir).get("attempts"),
            WATCHDOG_S + 60,
            "the first attempt's decision",
            run_dir,
        )[0]
        took = time.monotonic() - stopped_at
        rec = runs.wait_final(job_id, timeout=240)
    finally:
        try:  # SIGKILL ends a stopped process; SIGCONT for good measure
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    # the job step ended within the limit plus srun's kill and the decision
    assert took < WATCHDOG_S + 30, (took, logs(run_dir))
    assert rec["JobState"] == "COMPLETED" and int(rec["Restarts"]) >= 1, logs(run_dir)
    assert attempt["decision"] == "requeue", attempt

    events = [e for e in rundir.read_events(run_dir) if e["event"] == "hung"]
    # rank 1 may report too: srun's SIGCONT before its kill lets it see the time it lost, and it
    # names itself (it once finished its step, trained on and blamed rank 0 in the next one)
    assert {e["suspect_rank"] for e in events} == {1}, events
    (hung,) = [e for e in events if e["rank"] == 0]
    assert hung["suspect_host"] == socket.gethostname() and hung["job_id"] == job_id, hung
    assert hung["limit_s"] == WATCHDOG_S and WATCHDOG_S <= hung["waited_s"] < WATCHDOG_S + 5
    assert hung["phase"] == "step" and hung["step"] > 10, hung
    text = "\n".join(p.read_text(errors="replace") for p in (run_dir / rundir.LOGS).glob("train-*"))
    assert "[watchdog] rank 0: no progress for" in text and "suspect: rank 1 on" in text, text
    assert "most recent call first" in text and "in _watch" in text, text  # every thread's stack

    assert runs.wait_final(ref_job, timeout=300)["JobState"] == "COMPLETED", logs(ref_dir)
    assert_finished(run_dir, TL_STEPS)
    resumed = re.findall(r"resumed from \S+step-0*(\d+)", logs(run_dir, tail=None))
    assert resumed and int(resumed[0]) >= 10, logs(run_dir)
    assert_same_weights(
        rundir.step_dir(ref_dir, TL_STEPS), rundir.step_dir(run_dir, TL_STEPS), tmp_path
    )
