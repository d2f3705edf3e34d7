"""Commands that look at runs: status, logs, cancel, list, plot. They read the run directory
(config.yaml, submission.json, events.jsonl, metrics.jsonl, logs/) and ask the run's backend
about its jobs; they never resolve a configuration again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bionemo import rundir
from launchers import backends, plot, record, requeue, runs, sweep
from launchers.commands import echo, error, find_run, load_saved
from launchers.config import ConfigError


def cmd_status(args) -> int:
    run_dir = find_run(args.run)
    saved = load_saved(run_dir)
    data = record.load(run_dir)
    name = data.get("backend") or saved.get("job", {}).get("backend", "?")
    ids = record.job_ids(data)
    echo(f"run       {run_dir}")
    echo(f"backend   {name} (cluster {saved.get('cluster', {}).get('name', '?')})")
    jobs = [f"{j['job_id']} ({j['command']})" for j in data.get("jobs", []) if j.get("job_id")]
    echo(f"jobs      {', '.join(jobs) or '-'}")
    if ids and name in backends.SCHEDULED:
        for job_id, state in backends.get(name).states(run_dir, saved, ids[-1:]).items():
            echo(f"state     job {job_id}: {runs.left_controller(job_id, saved, state)}")
    if saved.get("sweep"):
        _sweep_status(run_dir, saved)
    else:
        latest = rundir.latest_complete_step(run_dir)
        max_steps = saved.get("trainer", {}).get("train", {}).get("max_steps", "?")
        logged = _last_logged_step(run_dir)
        echo(
            f"progress  latest complete checkpoint: "
            f"{'none' if latest is None else f'step {latest}'}"
            f"; last logged step: {'-' if logged is None else logged} of {max_steps}"
        )
        speed = runs.speed(run_dir, max_steps)
        if speed:
            echo(f"speed     {speed}")
        echo(f"finished  {'yes' if rundir.is_finished(run_dir) else 'no'}")
    attempts = data.get("attempts", [])
    if attempts:
        a = attempts[-1]
        echo(
            f"last      {a.get('time')} job {a.get('job_id')} restart {a.get('restart')}: "
            f"exit {requeue.explain_exit(a.get('exit_code'))}, {a.get('outcome')} -> "
            f"{a.get('decision')}"
        )
        echo(f"reason    {a.get('reason')}")
        echo(
            f"attempts  {len(attempts)} ({sum(a.get('decision') == 'requeue' for a in attempts)}"
            " requeued by the launcher)"
        )
    _unrecorded_decision(run_dir, attempts[-1] if attempts else {})
    for e in data.get("events", [])[-3:]:
        echo(f"event     {e.get('time')} {e.get('event')} {e.get('detail', '')}".rstrip())
    for e in rundir.read_events(run_dir)[-STATUS_EVENTS:]:
        echo(f"event     {_trainer_event(e)}")
    _disk(run_dir)
    return 0


STATUS_EVENTS = 5  # the newest records of events.jsonl that `status` shows
_EVENT_KEYS = (
    "file",
    "reason",
    "rank",
    "waited_s",
    "suspect_rank",
    "suspect_host",
    "filesystem",
    "detail",
    "decision",
    "unrecorded",
)


def _trainer_event(e: dict) -> str:
    """One record of events.jsonl on one line: time, event, step, host, then what it says."""
    what = "; ".join(f"{k} {e[k]}" for k in _EVENT_KEYS if e.get(k) not in (None, ""))
    line = f"{e.get('time')} {e.get('event')} step {e.get('step', '-')} on {e.get('host')}" + (
        f": {what}" if what else ""
    )
    return line if len(line) <= 240 else line[:237] + "..."


def _unrecorded_decision(run_dir: Path, last: dict) -> None:
    """The batch log's last decision when submission.json does not hold it (the requeue step
    could not write it, e.g. on a full disk): the log line is printed before anything is recorded."""
    logs = sorted(
        [*(run_dir / rundir.LOGS).glob("*.out"), *(run_dir / "submitit").glob("*.out")],
        key=lambda p: p.stat().st_mtime,
    )
    for log in reversed(logs[-3:]):
        try:
            with open(log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 65536))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        found = [i for i, line in enumerate(lines) if line.startswith(requeue.DECISION)]
        if not found:
            continue
        decision, _, reason = lines[found[-1]][len(requeue.DECISION) :].strip().partition(" -- ")
        if last.get("decision") == decision and str(last.get("reason", "")).startswith(reason):
            return  # recorded (an amended reason only grows)
        echo(f"decision  {decision} -- {reason}")
        why = next(
            (line for line in lines[found[-1] :] if "could not record" in line),
            "it is not in submission.json",
        )
        echo(f"          (from {log}: {why.removeprefix('[launcher] ')})")
        return


def _disk(run_dir: Path) -> None:
    """Say so when the run directory's filesystem is (nearly) full: nothing may have been
    recorded, and a resume would fail at its first save."""
    try:
        st = os.statvfs(run_dir)
    except OSError:
        return
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if size and free < 0.02 * size:
        echo(
            f"disk      {free / 2**20:.1f} MiB free of {size / 2**20:.1f} MiB on the run "
            "directory's filesystem: nearly full; free space before `resume`"
        )


def _sweep_status(run_dir: Path, saved: dict) -> None:
    """A sweep's progress: the trials started so far, then its result per recompute policy."""
    sw = saved["sweep"]
    trials = sorted((run_dir / sweep.TRIALS).glob("*/*/*-mbs*"))
    echo(
        f"sweep     micro batch {sw.get('min')}..{sw.get('max')}, recompute "
        f"{','.join(sw.get('recompute', []))}; trials started: {len(trials)}"
        + (f" (latest {trials[-1].name})" if trials else "")
    )
    model = Path(saved.get("job", {}).get("model", "?")).stem
    result = run_dir / sweep.RESULTS / f"{model}.json"
    if not result.is_file():
        echo(f"results   none yet ({result})")
        return
    data = json.loads(result.read_text())
    for policy, found in data.get("policies", {}).items():
        echo(
            f"result    {policy}: largest micro batch {found.get('max_micro_batch_size')}, "
            f"fastest {found.get('micro_batch_size')} ({found.get('tokens_per_s_per_gpu') or 0:,.0f}"
            f" tokens/s/GPU)"
        )
    echo(f"results   {result.with_suffix('.md')} (and {sw.get('out')}/{data.get('gpu')}/)")


def _last_logged_step(run_dir: Path):
    path = run_dir / rundir.METRICS
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line).get("step")
        except ValueError:
            continue
    return None


def cmd_logs(args) -> int:
    run_dir = find_run(args.run)
    data = record.load(run_dir)
    name = data.get("backend") or load_saved(run_dir).get("job", {}).get("backend")
    # a backend that keeps logs of its own (submitit, NeMo-Run) names its newest ones
    own = getattr(backends.get(name), "log_files", None) if name in backends.NAMES else None
    logs = sorted((run_dir / rundir.LOGS).glob("*"), key=lambda p: p.stat().st_mtime)
    newest = own(run_dir, load_saved(run_dir), record.job_ids(data)) if own else None
    if newest is None:
        newest = [p for p in (_newest(logs, "slurm-"), _newest(logs, "train-")) if p]
    logs = list(dict.fromkeys(logs + newest))
    if not logs:
        echo(f"no logs yet in {run_dir / rundir.LOGS}")
        return 0
    if args.follow:
        os.execvp("tail", ["tail", "-n", str(args.lines), "-F", *map(str, newest)])
    echo("logs: " + ", ".join(p.name for p in logs))
    for p in newest:
        echo(f"==> {p} <==")
        lines = p.read_text(errors="replace").splitlines()
        echo("\n".join(lines[-args.lines :]))
    return 0


def _newest(paths: list[Path], prefix: str) -> Path | None:
    found = [p for p in paths if p.name.startswith(prefix)]
    return found[-1] if found else None


def cmd_cancel(args) -> int:
    run_dir = find_run(args.run)
    saved = load_saved(run_dir)
    data = record.load(run_dir)
    name = data.get("backend") or saved.get("job", {}).get("backend")
    ids = record.job_ids(data)
    if name not in backends.SCHEDULED or not ids:
        echo(f"nothing to cancel: {run_dir} has no scheduler jobs")
        return 0
    cancelled = backends.get(name).cancel(run_dir, saved, ids)
    record.add_event(run_dir, "cancel", detail="jobs " + ", ".join(cancelled))
    echo(f"cancelled job(s) {', '.join(cancelled)} of {run_dir}")
    return 0


def cmd_list(args) -> int:
    """Every run under the runs root (a path, or --cluster's cluster.runs_root): launchers/runs.py."""
    root = Path(args.root) if args.root else runs.runs_root(args.cluster or "local")
    if args.root and not root.is_dir():
        raise ConfigError(
            "command line",
            "ROOT",
            f"{root} is not a directory",
            "pass a runs root (e.g. runs) or --cluster NAME",
        )
    found = runs.rows(root) if root.is_dir() else []
    echo(runs.table(found) if found else f"no runs under {root}")
    return 0


def cmd_plot(args) -> int:
    run_dir = find_run(args.run)
    try:
        paths = plot.plot(run_dir)
    except plot.PlotError as e:
        error(str(e))
        return 1
    for path in paths:
        echo(str(path))
    return 0
