"""Runs as a whole: the table of every run under a runs root (`python -m launchers list`), a run's
speed and ETA from metrics.jsonl, and what SLURM's accounting (`sacct`) says of a job that has
left the controller (`status`, `list`).

A run's state is read from its files, then from the scheduler only when the files leave it open:

    finished  the trainer's `finished` marker exists
    queued    its newest job is pending (or requeued and waiting) in the scheduler
    running   its newest job is running; a local run: the run's files changed within LOCAL_ACTIVE_S
    stopped   saved and stopped (a time limit or a signal not requeued, max restarts, no progress,
              cancelled, preempted)
    failed    crashed, out of memory, hung, disk full, refused at submission, or ended without
              a record
    unknown   the scheduler did not answer

No torch; scontrol and sacct are asked once per run at most.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bionemo import rundir
from launchers import config, record
from launchers.backends import sbatch
from launchers.backends.base import GONE, BackendError
from launchers.config import ConfigError, load_resolved

QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING")
LIVE = QUEUED + (
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
)
FAILED_OUTCOMES = ("crashed", "oom", "hung", "disk_full")
LOCAL_ACTIVE_S = 600  # a local run whose files changed this recently is taken to be running
METRICS_TAIL_BYTES = 65536  # enough for the last few records of metrics.jsonl

# sacct: allocations only (-X), no header (-n), '|'-separated (-P); the newest record of a job id
# (a requeued job's earlier runs need --duplicates). With -j, sacct searches from the epoch.
SACCT_FIELDS = ("JobID", "State", "ExitCode", "Elapsed", "Timelimit", "Start", "End", "NodeList")
SACCT_TIMEOUT_S = 10


# ------------------------------------------------------------------------------------ sacct


def sacct_command(job_id: str) -> list[str]:
    return ["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", ",".join(SACCT_FIELDS)]


def parse_sacct(text: str) -> list[dict[str, str]]:
    """sacct_command()'s output: one dict per line (lines of another shape are skipped)."""
    rows = []
    for line in text.splitlines():
        values = line.strip().split("|")
        if len(values) == len(SACCT_FIELDS) and values[0]:
            rows.append(dict(zip(SACCT_FIELDS, values)))
    return rows


def describe_sacct(row: dict[str, str]) -> str:
    """One line: state, exit code, run time of limit, end, nodes."""
    text = f"{row['State']} (sacct), exit {row['ExitCode']}, ran {row['Elapsed']}"
    if row.get("Timelimit") not in (None, "", "UNLIMITED", "Partition_Limit"):
        text += f" of {row['Timelimit']}"
    if row.get("End") not in (None, "", "Unknown", "None"):
        text += f", ended {row['End']}"
    if row.get("NodeList") not in (None, "", "None assigned"):
        text += f" on {row['NodeList']}"
    return text


def accounting(job_id: str, env: dict) -> tuple[dict[str, str] | None, str]:
    """(sacct's record of the job or None, one line saying what it is or why there is none).
    A cluster without accounting storage makes sacct fail: that is said, not raised."""
    try:
        out = subprocess.run(
            sacct_command(job_id), env=env, capture_output=True, text=True, timeout=SACCT_TIMEOUT_S
        )
    except FileNotFoundError:
        return None, "no accounting (sacct not found)"
    except subprocess.TimeoutExpired:
        return None, f"no accounting (sacct did not answer within {SACCT_TIMEOUT_S} s)"
    except OSError as e:
        return None, f"no accounting (sacct: {e.strerror})"
    if out.returncode != 0:
        said = (out.stderr or out.stdout).strip().splitlines()
        return None, f"no accounting (sacct: {said[-1] if said else f'exit {out.returncode}'})"
    rows = parse_sacct(out.stdout)
    mine = [r for r in rows if r["JobID"] == str(job_id)] or rows
    if not mine:
        return None, "no accounting record of this job (sacct)"
    return mine[-1], describe_sacct(mine[-1])


def left_controller(job_id: str, saved: dict, state: str) -> str:
    """`status`'s state of a job: a job scontrol no longer knows is described from sacct; where
    sacct has nothing (no accounting storage, as on the bundled cluster), the state as it was
    plus why."""
    if not state.startswith(GONE):
        return state
    row, text = accounting(job_id, sbatch.client_env(saved.get("cluster", {})))
    return f"{text}; {GONE}" if row else f"{state}; {text}"


# ------------------------------------------------------------------------------------ progress


def train_records(run_dir: Path, tail_bytes: int = METRICS_TAIL_BYTES) -> list[dict]:
    """The train records in the last `tail_bytes` of metrics.jsonl, oldest first."""
    try:
        with open(Path(run_dir) / rundir.METRICS, "rb") as f:
            f.seek(0, os.SEEK_END)
            start = max(0, f.tell() - tail_bytes)
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines[1:] if start else lines:  # a cut first line is no record
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "train":
            out.append(rec)
    return out


def speed(run_dir: Path, max_steps) -> str | None:
    """'2.31 steps/s at step 120 (logged 14 s ago); ETA 0:02:53 to step 520', from the newest
    train record (the trainer's steps_per_s: wall clock between its log lines)."""
    recs = train_records(run_dir)
    if not recs:
        return None
    last = recs[-1]
    rate = last.get("steps_per_s")
    if not rate and len(recs) > 1 and last["time"] > recs[-2]["time"]:  # records of before
        rate = (last["step"] - recs[-2]["step"]) / (last["time"] - recs[-2]["time"])
    age = max(0, round(time.time() - last.get("time", time.time())))
    text = f"at step {last['step']} (logged {duration(age)} ago)"
    if not rate or rate <= 0:
        return f"- steps/s {text}"
    text = f"{rate:.3g} steps/s {text}"
    if isinstance(max_steps, int) and last["step"] < max_steps:
        text += f"; ETA {duration((max_steps - last['step']) / rate)} to step {max_steps}"
    return text


def duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


# ------------------------------------------------------------------------------------ list


@dataclass
class Row:
    time: str  # when the run was created (submission.json), else config.yaml's mtime
    run: str  # <experiment>/<run>, relative to the runs root
    backend: str
    state: str
    checkpoint: str  # step of the newest complete checkpoint
    decision: str  # the last requeue decision and the outcome it was about


COLUMNS = ("submitted", "run", "backend", "state", "checkpoint", "last decision")


def find(root: Path) -> list[Path]:
    """Run directories under `root` (<root>/<experiment>/<run>/config.yaml), or `root` itself."""
    root = Path(root)
    found = {
        p.parent
        for pattern in (rundir.CONFIG, f"*/{rundir.CONFIG}", f"*/*/{rundir.CONFIG}")
        for p in root.glob(pattern)
    }
    return sorted(found)


def rows(root: Path) -> list[Row]:
    """One Row per run under `root`, oldest first."""
    silent: set[str] = set()  # clusters whose controller did not answer: not asked again
    out = [row(run_dir, Path(root), silent) for run_dir in find(root)]
    return sorted(out, key=lambda r: (r.time, r.run))


def row(run_dir: Path, root: Path, silent: set[str] | None = None) -> Row:
    data = record.load(run_dir)
    saved = _saved(run_dir)
    backend = data.get("backend") or (saved.get("job") or {}).get("backend") or "?"
    created = data.get("created") or time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime((run_dir / rundir.CONFIG).stat().st_mtime)
    )
    latest = rundir.latest_complete_step(run_dir)
    last = last_decision(run_dir, data)
    decided = f"{last.get('decision')} ({last.get('outcome')})" if last else "-"
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    return Row(
        time=created,
        run=name,
        backend=backend,
        state=state(run_dir, data, saved, backend, silent),
        checkpoint="-" if latest is None else str(latest),
        decision=decided,
    )


def last_decision(run_dir: Path, data: dict) -> dict:
    """The newest attempt: submission.json's, or events.jsonl's `decision` record when the
    requeue step could not write submission.json (a full disk)."""
    attempts = list(data.get("attempts", []))
    attempts += [e for e in rundir.read_events(run_dir) if e.get("event") == "decision"]
    return max(attempts, key=lambda a: str(a.get("time", "")), default={})


def state(
    run_dir: Path, data: dict, saved: dict, backend: str, silent: set[str] | None = None
) -> str:
    if rundir.is_finished(run_dir):
        return "finished"
    last = last_decision(run_dir, data)
    jobs = data.get("jobs", [])
    ids = record.job_ids(data)
    if backend in ("sbatch", "submitit", "nemo_run") and ids:
        closed = last.get("job_id") == ids[-1] and last.get("decision") == "stop"
        if not closed:
            job_state = scheduler_state(ids[-1], saved, silent)
            if job_state in QUEUED:
                return "queued"
            if job_state in LIVE:
                return "running"
            if job_state == "unknown":
                return "unknown"
    elif backend == "local" and jobs and jobs[-1].get("time", "") > str(last.get("time", "")):
        if _recently_changed(run_dir):  # the foreground trainer records its attempt at exit
            return "running"
    return ended(data, last)


def ended(data: dict, last: dict) -> str:
    """The state of a run whose jobs have all ended, from its records."""
    after = [
        e.get("event")
        for e in data.get("events", [])
        if str(e.get("time", "")) >= str(last.get("time", ""))
    ]
    if "cancel" in after:
        return "stopped"
    if not last:
        return "failed"  # refused at submission, or ended before the requeue step could record
    outcome = last.get("outcome")
    if outcome in FAILED_OUTCOMES:
        return "failed"
    if outcome == "local":
        return "stopped" if last.get("exit_code") == rundir.REQUEUE_EXIT_CODE else "failed"
    return "stopped"  # stopped, timeout, terminated, or a requeue whose job then left


def scheduler_state(job_id: str, saved: dict, silent: set[str] | None = None) -> str | None:
    """scontrol's JobState of the job; None when the controller no longer knows it; 'unknown'
    when it does not answer (its cluster is then added to `silent`, and not asked again)."""
    cluster = saved.get("cluster", {})
    key = json.dumps(cluster.get("name"))
    if silent is not None and key in silent:
        return "unknown"
    try:
        rec = sbatch.job_record(job_id, sbatch.client_env(cluster))
    except BackendError:
        if silent is not None:
            silent.add(key)
        return "unknown"
    return None if rec is None else rec.get("JobState", "unknown").split()[0]


def _recently_changed(run_dir: Path) -> bool:
    paths = [run_dir / rundir.METRICS, *(run_dir / rundir.HEARTBEATS).glob("*")]
    newest = max((p.stat().st_mtime for p in paths if p.exists()), default=0)
    return time.time() - newest < LOCAL_ACTIVE_S


def _saved(run_dir: Path) -> dict:
    try:
        return load_resolved(run_dir / rundir.CONFIG)
    except ConfigError:
        return {}


def table(found: list[Row]) -> str:
    cells = [COLUMNS] + [
        (r.time, r.run, r.backend, r.state, r.checkpoint, r.decision) for r in found
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(line, widths)), line[-1]]).rstrip()
        for line in cells
    )


def runs_root(cluster: str) -> Path:
    """cluster.runs_root of a cluster profile, as `submit` resolves it (relative to the profile's
    workdir). Resolution needs a model; runs_root does not depend on it."""
    return Path(config.resolve(model="esm2_8m", cluster=cluster).config.cluster.runs_root)
