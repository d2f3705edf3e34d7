"""The hung-rank watchdog (bionemo/watchdog.py): limit sizing, and real processes that hang, are
stopped with SIGSTOP, or run slow saves. The trainer on the bundled cluster:
tests/integration/test_hung_rank.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bionemo import rundir, watchdog
from bionemo.watchdog import FLOOR_S, K, Watchdog, find_suspect, heartbeat_path, step_limit

REPO = Path(__file__).resolve().parents[1]

# One rank of a fake job: `steps` steps of 50 ms, then per mode: "hang" blocks (as in a
# collective whose peer is stopped), "slow-save" sleeps inside watchdog.slow() and finishes,
# "beat" keeps stepping until killed, "gil" runs one step of 3 limits that holds the interpreter
# lock (as a long C call can) and then steps on.
RANK = """
import sys, time
from bionemo.watchdog import Watchdog
run_dir, rank, mode, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])

def wait_in_collective():
    time.sleep(60)

with Watchdog(run_dir, rank, 2, limit, startup_s=3.0, attempt="job/0") as wd:
    step = 0
    while mode == "beat" or step < 5:
        time.sleep(0.05)
        step += 1
        wd.beat(step)
    if mode == "hang":
        wait_in_collective()
    if mode == "slow-save":
        with wd.slow("save"):
            time.sleep(3 * limit)
    if mode == "gil":
        sys.setswitchinterval(100.0)  # no other thread of this process runs while this one computes
        end = time.monotonic() + 3 * limit
        while time.monotonic() < end:
            pass
        step += 1
        wd.beat(step)
        sys.setswitchinterval(0.005)
    if mode in ("slow-save", "gil"):
        for _ in range(5):
            time.sleep(0.05)
            step += 1
            wd.beat(step)
print("done", step, wd.limit_s, flush=True)
"""


def start(run_dir: Path, rank: int, mode: str, limit: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", RANK, str(run_dir), str(rank), mode, str(limit)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_limit_is_sized_from_the_steps_never_below_the_first_step():
    assert step_limit(0, [], first_step_s=5) == FLOOR_S  # a short step: the floor
    assert step_limit(0, [40.0, 25.0], first_step_s=5) == K * 40.0  # K x the slowest recent
    assert step_limit(0, [1.0], first_step_s=900) == 900  # the first step compiled for 15 min
    assert step_limit(12, [100.0], first_step_s=900) == 12  # trainer.train.watchdog_s, as set

    wd = Watchdog(Path("/nonexistent"), 0, 1, 0.0, startup_s=1000)
    assert wd.limit_s == 1000  # start-up: nothing measured yet
    for step in range(1, 4):
        wd.beat(step)
    assert wd.limit_s == FLOOR_S
    with wd.slow("save"):
        assert wd.limit_s == 1000  # a save may take longer than a step
    assert wd.limit_s == FLOOR_S
    assert Watchdog(Path("/x"), 0, 1, 2000.0, startup_s=10).limit_s == 2000  # never below the set


def test_hung_rank_dumps_its_stacks_records_the_stopped_peer_and_exits_124(tmp_path):
    """Rank 1 is SIGSTOPped (it cannot fire its own watchdog); rank 0 then blocks, as in the
    all-reduce that waits for rank 1, and its watchdog names rank 1 from the heartbeat files."""
    peer = start(tmp_path, 1, "beat", 2.0)
    hung = None
    try:
        beat = heartbeat_path(tmp_path, 1)
        deadline = time.monotonic() + 60
        while not (beat.is_file() and json.loads(beat.read_text() or "{}").get("step", 0) > 2):
            assert time.monotonic() < deadline and peer.poll() is None, peer.stderr.read()
            time.sleep(0.05)
        os.kill(peer.pid, signal.SIGSTOP)
        hung = start(tmp_path, 0, "hang", 2.0)
        out, err = hung.communicate(timeout=60)
    finally:
        for p in (peer, hung):
            if p is not None and p.poll() is None:
                p.kill()
                os.kill(p.pid, signal.SIGCONT)
                p.wait()
    assert hung.returncode == rundir.HUNG_EXIT_CODE, out + err
    assert "done" not in out
    assert "[watchdog] rank 0: no progress for" in err and "in step after step 5" in err, err
    assert "suspect: rank 1 on" in err and "process stopped, frozen or gone" in err, err
    # every thread's stack: the blocked main thread where it waits, and the watchdog's own
    assert "Current thread" in err and "in wait_in_collective" in err, err
    assert 'File "<string>", line' in err and "in _watch" in err, err
    (event,) = [e for e in rundir.read_events(tmp_path) if e["event"] == "hung"]
    assert event["rank"] == 0 and event["step"] == 5 and event["phase"] == "step"
    assert event["suspect_rank"] == 1 and event["suspect_host"] == socket.gethostname()
    assert event["limit_s"] == 2.0 and 2.0 <= event["waited_s"] < 6.0, event


def test_slow_phase_and_regular_steps_do_not_fire(tmp_path):
    """A save three times longer than the step limit runs under slow(); the run ends with 0 and
    its heartbeat says it exited."""
    proc = start(tmp_path, 0, "slow-save", 0.5)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert out.split() == ["done", "10", "0.5"], out
    assert rundir.read_events(tmp_path) == []
    beat = json.loads(heartbeat_path(tmp_path, 0).read_text())
    assert beat["state"] == "exited" and beat["step"] == 10 and beat["pid"] == proc.pid


def test_suspect_is_the_rank_behind_when_all_are_alive(tmp_path):
    now = time.time()
    for rank, step in ((1, 12), (2, 11), (3, 12)):
        path = heartbeat_path(tmp_path, rank)
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            json.dumps(
                dict(
                    rank=rank,
                    host=f"node{rank}",
                    pid=1,
                    attempt="7/1",
                    step=step,
                    state="running",
                    interval_s=5.0,
                    written=now,
                )
            )
        )
    assert find_suspect(tmp_path, 4, "7/1", me=0, my_step=12)["suspect_rank"] == 2
    found = find_suspect(tmp_path, 4, "7/1", me=0, my_step=12, now=now + 30)  # all silent
    assert found["suspect_rank"] == 1 and "no heartbeat for 30.0 s" in found["suspect_reason"]
    found = find_suspect(tmp_path, 4, "7/2", me=0, my_step=12)  # the files of the last start
    assert found == dict(
        suspect_rank=1,
        suspect_host=None,
        suspect_reason="rank 1: no heartbeat from this start of the run",
    )
    assert find_suspect(tmp_path, 1, "7/1", me=0, my_step=3) == {}
    assert watchdog.HEARTBEATS in str(heartbeat_path(tmp_path, 0))


def stop_and_continue(proc: subprocess.Popen, run_dir: Path, at) -> tuple[str, str]:
    """SIGSTOP rank 1 once its heartbeat's step satisfies `at`, SIGCONT it 4.5 s later (its
    watchdog thread then oversleeps by more than FROZEN_S); its output once it ends."""
    try:
        beat = heartbeat_path(run_dir, 1)
        deadline = time.monotonic() + 60
        while not (beat.is_file() and at(json.loads(beat.read_text() or "{}").get("step", 0))):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(4.5)
        os.kill(proc.pid, signal.SIGCONT)
        return proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_rank_that_was_stopped_names_itself_when_it_runs_again(tmp_path):
    """A stopped rank's watchdog cannot run; once continued (srun's SIGCONT before its kill),
    it notices that its own process did not run and records itself as the suspect."""
    proc = start(tmp_path, 1, "hang", 2.0)
    out, err = stop_and_continue(proc, tmp_path, lambda step: step == 5)  # before its 2 s limit
    assert proc.returncode == rundir.HUNG_EXIT_CODE, out + err
    assert "suspect: this rank: its process did not run for" in err, err
    (event,) = rundir.read_events(tmp_path)
    assert event["rank"] == 1 and event["suspect_rank"] == 1 and event["step"] == 5, event


def test_a_rank_stopped_mid_step_names_itself_whichever_thread_runs_first(tmp_path):
    """Stopped while it steps on: once continued, either its watchdog thread sees that it
    overslept, or its main thread finishes the step and beat() sees the step ran past the limit
    while the watchdog could not run (which thread runs first is the kernel's choice; the next
    test forces the second). Either way it names itself; it never trains on to blame a peer in
    its next collective, as the bundled cluster's hung-rank run once recorded."""
    proc = start(tmp_path, 1, "beat", 2.0)
    out, err = stop_and_continue(proc, tmp_path, lambda step: step > 5)
    assert proc.returncode == rundir.HUNG_EXIT_CODE, out + err
    assert "suspect: this rank: its process did not run for" in err, err
    (event,) = rundir.read_events(tmp_path)
    assert event["rank"] == 1 and event["suspect_rank"] == 1, event


def test_a_step_that_holds_the_interpreter_lock_past_the_limit_fires_from_beat(tmp_path):
    """The watchdog thread cannot run while a call holds the interpreter lock; the step's own
    beat() fires instead of letting the rank train on as if nothing happened."""
    proc = start(tmp_path, 0, "gil", 2.0)  # held 6 s: the watchdog oversleeps by > FROZEN_S
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == rundir.HUNG_EXIT_CODE, out + err
    assert "done" not in out
    assert "[watchdog] rank 0: no progress for" in err and "in step after step 5" in err, err
    assert "suspect: this rank: its process did not run for" in err, err
    assert "in beat" in err, err  # fired from the main thread
    (event,) = rundir.read_events(tmp_path)
    assert event["suspect_rank"] == 0 and event["limit_s"] == 2.0 and event["waited_s"] >= 6.0
