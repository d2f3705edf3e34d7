"""submission.json: the launcher's record of a run (backend, job ids, attempts and decisions).

    {
      "version": 1,
      "run_dir": "...", "backend": "sbatch", "cluster": "local", "kind": "train",
      "created": "...",
      "policy": {"max_restarts": 50, "time_limit_s": 1800, "signal_lead_s": 60},
      "jobs": [{"job_id": "12", "command": "submit", "time": "...", "timings": {...}}],
      "attempts": [{"job_id": "12", "restart": 0, "host": "node1", "exit_code": 75,
                    "outcome": "stopped", "latest_step": 40, "decision": "requeue",
                    "reason": "...", "time": "..."}],
      "events": [{"event": "cancel", "time": "...", "detail": "..."}]
    }

Written by the CLI (submit, resume, cancel) and by the batch script's requeue step on the first
node, possibly at the same moment, so every change is a read-modify-write under an exclusive lock
followed by an atomic rename. On a full disk the new copy does not fit: the write raises OSError
before the rename, the old record stays whole, and the caller decides (launchers/requeue.py then
appends its decision to events.jsonl, a line that fits where a new copy does not). Stdlib only:
the batch host may run a bare python3.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from bionemo.rundir import SUBMISSION  # stdlib only, like this module

VERSION = 1


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def path(run_dir) -> Path:
    return Path(run_dir) / SUBMISSION


def load(run_dir) -> dict:
    """The record, or an empty one when the run has none yet."""
    try:
        with open(path(run_dir)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"version": VERSION, "jobs": [], "attempts": [], "events": []}


@contextlib.contextmanager
def _locked(run_dir):
    lock = Path(run_dir) / (SUBMISSION + ".lock")
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # e.g. Lustre mounted without flock: the atomic rename still holds
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write(run_dir, data: dict) -> None:
    target = path(run_dir)
    tmp = str(target.parent / f".{SUBMISSION}.{os.getpid()}.tmp")  # under the lock: unique
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def update(run_dir, change) -> dict:
    """Apply `change(record)` (which edits the dict in place) atomically; return the record."""
    with _locked(run_dir):
        data = load(run_dir)
        change(data)
        _write(run_dir, data)
        return data


def create(run_dir, *, backend: str, cluster: str, policy: dict, kind: str = "train") -> dict:
    def change(data):
        data.update(
            version=VERSION,
            run_dir=str(run_dir),
            backend=backend,
            cluster=cluster,
            kind=kind,
            created=now(),
            policy=policy,
        )

    return update(run_dir, change)


def add_job(run_dir, job_id, command: str, **extra) -> dict:
    return update(
        run_dir,
        lambda d: d.setdefault("jobs", []).append(
            {
                "job_id": None if job_id is None else str(job_id),
                "command": command,
                "time": now(),
                **extra,
            }
        ),
    )


def add_attempt(run_dir, attempt: dict) -> dict:
    return update(
        run_dir, lambda d: d.setdefault("attempts", []).append({"time": now(), **attempt})
    )


def amend_last_attempt(run_dir, **fields) -> dict:
    def change(data):
        if data.get("attempts"):
            data["attempts"][-1].update(fields)

    return update(run_dir, change)


def add_event(run_dir, event: str, **detail) -> dict:
    return update(
        run_dir,
        lambda d: d.setdefault("events", []).append({"event": event, "time": now(), **detail}),
    )


def job_ids(data: dict) -> list[str]:
    return [j["job_id"] for j in data.get("jobs", []) if j.get("job_id")]
