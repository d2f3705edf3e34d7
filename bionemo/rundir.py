"""The run directory: the one place the launcher and the trainer meet (torch-free).

runs/<experiment>/<run>/
  config.yaml          resolved configuration (sections job, cluster, trainer)
  train.sbatch         rendered batch script (SLURM backends)
  submission.json      the launcher's record: backend, job ids, attempts and decisions
  logs/                scheduler and trainer output
  metrics.jsonl        one JSON object per logged step / validation
  events.jsonl         the trainer's faults, one JSON object a line (checkpoint_rejected,
                       no_intact_checkpoint, hung, disk_full, oom, stopped), and the launcher's
                       `decision` when submission.json could not be written (full disk):
                       what `status` and the requeue decision read
  heartbeats/rank-N.json   each rank's last step and time (the watchdog names a hung rank)
  checkpoints/step-00000040/   complete only once its COMPLETE marker and manifest.json exist
  final_model/         the last weights as a Hugging Face folder (bionemo/export.py)
  tensorboard/         TensorBoard event files beside metrics.jsonl
  plots/               loss and throughput plots (make plot)
  finished             written by the trainer after the last step; never requeue after it
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

CONFIG = "config.yaml"
SCRIPT = "train.sbatch"
SUBMISSION = "submission.json"
LOGS = "logs"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINISHED = "finished"
COMPLETE = "COMPLETE"  # marker inside a checkpoint folder, written last, after every rank finished
MANIFEST = "manifest.json"  # per-file sizes and checksums of a checkpoint, written before COMPLETE
EVENTS = "events.jsonl"
HEARTBEATS = "heartbeats"  # <run_dir>/heartbeats/rank-00001.json, one file per rank
TENSORBOARD = "tensorboard"  # <run_dir>/tensorboard/: event files (rank 0)
PLOTS = "plots"  # <run_dir>/plots/: make plot
COMPILE_CACHE = (
    "compile_cache"  # <run_dir>/compile_cache/: torch.compile's caches (bionemo/train.py)
)

# The trainer's exit codes: the contract read by the requeue decision (launchers/requeue.py).
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: told to stop, every rank saved; requeue me
OOM_EXIT_CODE = 12  # ENOMEM: out of memory (a finding for the micro-batch sweep)
HUNG_EXIT_CODE = 124  # timeout(1)'s: the watchdog saw no progress within its limit
DISK_FULL_EXIT_CODE = 28  # ENOSPC: a save found no space left on the device

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def checkpoint_steps(run_dir: Path) -> tuple[list[int], list[Path]]:
    """(steps of complete checkpoints ascending, folders that look like checkpoints but are not)."""
    root = Path(run_dir) / CHECKPOINTS
    complete, incomplete = [], []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if not d.is_dir() or not m:
                if d.is_dir():
                    incomplete.append(d)  # e.g. step-00000040.partial: a save that never finished
                continue
            (complete.append(int(m.group(1))) if (d / COMPLETE).is_file() else incomplete.append(d))
    return sorted(complete), incomplete


def latest_complete_step(run_dir: Path) -> int | None:
    steps, _ = checkpoint_steps(run_dir)
    return steps[-1] if steps else None


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / FINISHED).is_file()


def append_event(run_dir: Path, event: str, **fields) -> dict:
    """Append one fault record to `events.jsonl` (any rank, any time; one short O_APPEND write, so
    lines from several processes do not interleave). Never raises: on a full disk the record is
    lost but the caller's own error handling goes on; the record is returned for logging."""
    rec = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "event": event,
        "host": socket.gethostname(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        **fields,
    }
    try:
        line = (json.dumps(rec, default=str) + "\n").encode()
        fd = os.open(Path(run_dir) / EVENTS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass
    return rec


def read_events(run_dir: Path) -> list[dict]:
    """Every record of `events.jsonl` (oldest first); unreadable lines are skipped."""
    out: list[dict] = []
    try:
        text = (Path(run_dir) / EVENTS).read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
