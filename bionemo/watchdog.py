"""Per-step heartbeat and a watchdog thread: a rank that makes no progress ends its process
instead of holding the allocation until the collective's own timeout (NCCL: 10 min, gloo: 30).

A hung rank waits in a collective (a peer was stopped, died or deadlocked) or in I/O. Its main
thread cannot run Python until that call returns, so only another thread can notice, and only
`os._exit` can end the process (a blocked thread cannot unwind). Those waits release the GIL, so
the watchdog thread keeps running. On firing it records a "hung" event (rundir.EVENTS), writes
every thread's stack to stderr (the rank's log) and exits HUNG_EXIT_CODE; the requeue policy
treats that as retryable.

The limit (seconds since the last finished step):
- before the first step (process group, checkpoint load, first compile): STARTUP_S;
- then `trainer.train.watchdog_s` when set, else max(K x the slowest of the last RECENT steps,
  FLOOR_S, the first step's duration, which includes compile and loading);
- around a checkpoint save or a validation (`slow()`): at least STARTUP_S; they take longer than a
  step but must still end.

A stopped rank (SIGSTOP, a frozen node) cannot fire its own watchdog: its peers block in the next
collective and fire theirs. To name it, each rank's heartbeat thread rewrites
`<run_dir>/heartbeats/rank-NNNNN.json` every few seconds (host, pid, last step); a firing rank
reads them and suspects a rank whose file stopped being written, else one behind the others.
The stopped rank itself, once continued (srun sends SIGCONT before it kills a step), names itself:
its watchdog thread sees that it overslept, or, when the main thread runs first and finishes the
step it was stopped in, `beat()` sees that the step ran past the limit (the watchdog thread could
not run: the process was stopped, or a call held the interpreter lock) and fires there. Without
that second check the rank would train on until its next collective with the peers srun is
killing, and its watchdog would then blame one of them. Writing and reading happen off the
watchdog thread, so a hung filesystem cannot stop it firing.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from bionemo import rundir

HEARTBEATS = rundir.HEARTBEATS
STARTUP_S = 1800.0  # first step, saves, validation: a 15B checkpoint load + compile fit easily
FLOOR_S = 300.0  # the auto limit: above any hiccup (GC, a slow read), below NCCL's 10-min timeout
K = 10  # the auto limit: this many times the slowest recent step
RECENT = 20  # steps the auto limit looks back over
SCAN_RANKS = 8  # only these ranks read every heartbeat file: on a large job all ranks fire at once
FROZEN_S = 3.0  # the watchdog thread woke this much later than it asked: the process was frozen
EVENT_WAIT_S = 15.0  # at most this long for the event record (the run dir may be on a hung mount)


def step_limit(configured_s: float, recent_s, first_step_s: float) -> float:
    """The limit after the first step: the configured value, else sized from the step times."""
    if configured_s > 0:
        return float(configured_s)
    return max(K * max(recent_s, default=0.0), FLOOR_S, first_step_s)


def heartbeat_interval(configured_s: float) -> float:
    """How often a rank rewrites its heartbeat file: often enough that a silent rank is noticed
    well within the limit, rarely enough to be free on a parallel filesystem."""
    return min(5.0, max(0.2, configured_s / 10)) if configured_s > 0 else 5.0


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / HEARTBEATS / f"rank-{rank:05d}.json"


class Watchdog:
    """Use as a context manager around the training loop; `beat(step)` after every step,
    `with slow("save"):` around saves and validation."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        configured_s: float = 0.0,
        startup_s: float = STARTUP_S,
        attempt: str = "",
    ):
        """`attempt` names this start of the run (job id and restart): heartbeat files of an
        older start are not evidence."""
        self.run_dir, self.rank, self.world_size = Path(run_dir), rank, world_size
        self.attempt = attempt
        self.configured_s, self.startup_s = configured_s, max(startup_s, configured_s)
        self.interval_s = heartbeat_interval(configured_s)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._recent: deque[float] = deque(maxlen=RECENT)
        self._first_step_s: float | None = None
        self._step_limit = self.startup_s
        # (last progress, limit, phase, step): one tuple, replaced whole, so the watchdog thread
        # never reads a limit from one phase with a start time from another
        self._state = (time.monotonic(), self.startup_s, "start-up", 0)
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        # when the watchdog thread last woke and how long it meant to sleep: beat() reads them to
        # tell how long the thread has not run
        self._woke, self._nap = time.monotonic(), 0.0
        self._firing = threading.Lock()  # the first of the two threads to fire does it

    # ------------------------------------------------------------------ the training loop's side

    def beat(self, step: int) -> None:
        now = time.monotonic()
        since, limit, phase, last_step = self._state
        took = now - since
        not_run_s = self._not_run_s(now) if self._threads else 0.0
        if took > limit and not_run_s:  # past the limit while the watchdog thread could not run
            self._fire(took, limit, phase, last_step, not_run_s)
        if self._first_step_s is None:
            self._first_step_s = took
        else:
            self._recent.append(took)
        self._step_limit = step_limit(self.configured_s, self._recent, self._first_step_s)
        self._state = (now, self._step_limit, "step", step)

    @contextmanager
    def slow(self, what: str):
        """A save or a validation: a longer limit while it runs; its time is not a step time."""
        _, _, phase, step = self._state
        self._state = (time.monotonic(), max(self._step_limit, self.startup_s), what, step)
        try:
            yield
        finally:
            self._state = (time.monotonic(), self._step_limit, phase, step)

    @property
    def limit_s(self) -> float:
        return self._state[1]

    def __enter__(self) -> "Watchdog":
        self._threads = [
            threading.Thread(target=self._watch, name="watchdog", daemon=True),
            threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for t in self._threads:
            t.join(timeout=2 * self.interval_s)

    # ------------------------------------------------------------------ the threads

    def _not_run_s(self, now: float) -> float:
        """How long the watchdog thread overslept, 0 below FROZEN_S: it did not run because the
        whole process did not (SIGSTOP, a frozen node) or a call held the interpreter lock, so
        this rank is the one that held the others up."""
        late = now - self._woke - self._nap
        return late if late > FROZEN_S else 0.0

    def _watch(self) -> None:
        while True:
            since, limit, phase, step = self._state
            now = time.monotonic()
            if now - since > limit:
                self._fire(now - since, limit, phase, step, self._not_run_s(now))
            self._woke, self._nap = now, min(1.0, max(0.05, (limit - (now - since)) / 2))
            if self._done.wait(self._nap):
                return

    def _heartbeat(self) -> None:
        path = heartbeat_path(self.run_dir, self.rank)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError:
            return  # no heartbeat file: peers cannot name this rank, the watchdog still works
        try:
            while not self._done.is_set():
                self._write_heartbeat(fd, "running")
                self._done.wait(self.interval_s)
            self._write_heartbeat(fd, "exited")
        finally:
            os.close(fd)

    def _write_heartbeat(self, fd: int, state: str) -> None:
        since, _, phase, step = self._state
        rec = dict(
            rank=self.rank,
            host=self.host,
            pid=self.pid,
            attempt=self.attempt,
            step=step,
            phase=phase,
            state=state,
            interval_s=self.interval_s,
            progress_time=time.time() - (time.monotonic() - since),
            written=time.time(),
        )
        # fixed length, written in place: no new inode per beat, and a reader never sees a
        # shorter record followed by the tail of a longer one
        data = json.dumps(rec).encode().ljust(511) + b"\n"
        try:
            os.pwrite(fd, data, 0)
        except OSError:
            pass

    def _fire(self, waited: float, limit: float, phase: str, step: int, frozen_s: float) -> None:
        """Record, dump every stack, exit HUNG_EXIT_CODE. Called by the watchdog thread, or by
        the main thread from beat(); whichever comes second waits for the first's exit."""
        if not self._firing.acquire(blocking=False):
            threading.Event().wait()
        found: dict = {}
        if frozen_s:
            found.update(
                suspect_rank=self.rank,
                suspect_host=self.host,
                suspect_reason=f"this rank: its process did not run for {frozen_s:.1f} s "
                "(stopped or frozen, or a call held the interpreter lock)",
            )
        recorder = threading.Thread(
            target=self._record,
            args=(waited, limit, phase, step, found),
            name="watchdog-record",
            daemon=True,
        )
        recorder.start()
        recorder.join(EVENT_WAIT_S)
        suspect = found.get("suspect_reason") or "not known"
        _stderr(
            f"[watchdog] rank {self.rank}: no progress for {waited:.1f} s (limit {limit:.1f} s)"
            f" in {phase} after step {step}; suspect: {suspect}; stacks of every thread "
            f"follow; exiting {rundir.HUNG_EXIT_CODE}\n"
        )
        faulthandler.dump_traceback(file=2, all_threads=True)
        os._exit(rundir.HUNG_EXIT_CODE)

    def _record(self, waited: float, limit: float, phase: str, step: int, found: dict) -> None:
        if not found and self.rank < SCAN_RANKS:
            found.update(find_suspect(self.run_dir, self.world_size, self.attempt, self.rank, step))
        rundir.append_event(
            self.run_dir,
            "hung",
            rank=self.rank,
            step=step,
            phase=phase,
            waited_s=round(waited, 1),
            limit_s=round(limit, 1),
            suspect_rank=found.get("suspect_rank"),
            suspect_host=found.get("suspect_host"),
            suspect_reason=found.get("suspect_reason"),
        )


def _stderr(text: str) -> None:
    """Straight to the file descriptor: no Python lock that a hung main thread might hold."""
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 -- a broken stdout must not keep the process alive
        pass
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def read_heartbeats(run_dir: Path, world_size: int) -> dict[int, dict]:
    """Every rank's last heartbeat record that can be read (rank -> record)."""
    out = {}
    for rank in range(world_size):
        try:
            rec = json.loads(heartbeat_path(run_dir, rank).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            out[rank] = rec
    return out


def find_suspect(
    run_dir: Path, world_size: int, attempt: str, me: int, my_step: int, now: float | None = None
) -> dict:
    """The rank most likely to hold the others up, from the heartbeat files: first one whose
    file stopped being written (stopped, frozen or gone), then one with no heartbeat from this
    start of the run, then the one furthest behind (this rank included). {} when nothing stands
    out."""
    now = time.time() if now is None else now
    beats = read_heartbeats(run_dir, world_size)
    silent, missing, steps = [], [], {me: my_step}
    for rank in range(world_size):
        if rank == me:
            continue
        rec = beats.get(rank)
        if rec is None or rec.get("attempt") != attempt:
            missing.append(rank)
            continue
        age = now - float(rec.get("written", 0))
        if rec.get("state") == "exited":
            silent.append(
                (
                    rank,
                    f"rank {rank} on {rec.get('host')} (pid {rec.get('pid')}) "
                    f"exited after step {rec.get('step')}",
                )
            )
        elif age > 3 * float(rec.get("interval_s", 5.0)) + 1:
            silent.append(
                (
                    rank,
                    f"rank {rank} on {rec.get('host')} (pid {rec.get('pid')}): no "
                    f"heartbeat for {age:.1f} s, after step {rec.get('step')} "
                    "(process stopped, frozen or gone)",
                )
            )
        else:
            steps[rank] = int(rec.get("step", 0))
    if silent:
        rank, reason = silent[0]
    elif missing:
        rank, reason = missing[0], f"rank {missing[0]}: no heartbeat from this start of the run"
    elif steps and min(steps.values()) < max(steps.values()):
        rank = min(steps, key=steps.get)
        reason = (
            f"rank {rank} on {beats.get(rank, {}).get('host', socket.gethostname())}: "
            f"behind, at step {steps[rank]} while others reached {max(steps.values())}"
        )
    else:
        return {}
    host = (
        None if rank in missing else socket.gethostname() if rank == me else beats[rank].get("host")
    )
    return dict(suspect_rank=rank, suspect_host=host, suspect_reason=reason)
