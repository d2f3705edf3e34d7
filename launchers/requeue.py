"""The requeue decision, run by the batch script after the trainer exits.

    python -m launchers.requeue RUN_DIR --exit-code RC [--elapsed S] [--terminated]

Policy, in order (the first rule that applies decides):

1. the `finished` marker exists             -> stop, never requeue
2. the scheduler sent SIGTERM (preemption,  -> leave it to SLURM: it requeues preempted jobs and
   node failure, scancel, scontrol requeue)    jobs on failed nodes itself (--requeue); a
                                               cancelled job stays cancelled
3. disk full: exit 28 (the trainer's        -> stop: a requeue would fail at the same save; free
   DISK_FULL_EXIT_CODE) or a `disk_full`       space, then `resume`
   event of this attempt
4. restarts (SLURM_RESTART_COUNT) >= job.max_restarts  -> stop
5. exit 75 (the trainer saved on the warning signal), or SIGTERM at the time limit
                                            -> requeue, unless the latest complete checkpoint is
                                               the one of the previous requeue (no progress)
6. out of memory (the trainer's OOM exit code) -> stop: the same job would run out again
7. hung: exit 124 (the watchdog's           -> like a crash (8); the attempt records the suspect
   HUNG_EXIT_CODE) or a `hung` event of        rank's node (`suspect_host`)
   this attempt
8. any other exit (a crash)                 -> requeue once; stop when the previous attempt also
                                               failed (crashed or hung) at the same latest
                                               checkpoint ("crashed twice at step N")

"This attempt's events" are the records of events.jsonl (bionemo/rundir.py) written under this
job id and restart count; a `checkpoint_rejected` event only adds a note to the reason (the loader
already fell back to an older checkpoint).

The decision is printed to the batch log first, then appended to submission.json (job id,
restart, exit code, latest complete step, decision, reason), before `scontrol requeue` runs,
because requeueing kills this job. On a full disk the record may not fit: then the attempt is
appended to events.jsonl instead (one short line), the batch log says what could not be written,
and the decision stands (`status` reads the log and the events). Exit code (the job's, which
`status` explains, explain_exit): 0 when the run finished or was requeued; 28 when it stopped for
a full disk, 124 when it stopped hung; otherwise the trainer's exit code (1 for a 0 without the
`finished` marker). Stdlib only and no torch: it runs in well under a second on the batch host.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bionemo import rundir
from launchers import record

REQUEUE_EXIT_CODE = rundir.REQUEUE_EXIT_CODE
TIME_LIMIT_SLACK_S = 30  # SIGTERM this close to the time limit is the time limit
DECISION = "[launcher] decision:"  # the batch log's line that `status` reads back
_MEANINGS = {
    rundir.REQUEUE_EXIT_CODE: "stopped and saved on a signal",
    rundir.OOM_EXIT_CODE: "out of memory",
    rundir.HUNG_EXIT_CODE: "hung: the watchdog saw no progress",
    rundir.DISK_FULL_EXIT_CODE: "disk full: a save found no space left",
}


# A stop for one of these outcomes exits with its code even when the trainer's was another (srun
# reports a rank killed after its peer's watchdog fired; torchrun turns 28 into 1).
_OWN_CODE = {"disk_full": rundir.DISK_FULL_EXIT_CODE, "hung": rundir.HUNG_EXIT_CODE}


def explain_exit(code) -> str:
    """What the trainer's (and so this step's) exit code means, for `status`."""
    if code in (None, ""):
        return "-"
    code = int(code)
    if code in _MEANINGS:
        return f"{code} ({_MEANINGS[code]})"
    if code > 128:
        try:
            return f"{code} (killed by {signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"{code} (finished)" if code == 0 else f"{code} (a crash)"


def _step(step) -> str:
    return "no checkpoint yet" if step is None else f"step {step}"


def decide(
    *,
    finished: bool,
    exit_code: int,
    latest_step,
    restarts: int,
    policy: dict,
    history: list,
    terminated: bool = False,
    elapsed_s: float | None = None,
    events: Sequence[dict] = (),
) -> dict:
    """Return {"outcome", "decision", "reason"} (+ "suspect_rank", "suspect_host" when hung);
    decision is requeue, stop or none. `events`: this attempt's records of events.jsonl."""
    requeue_code = policy.get("requeue_exit_code", REQUEUE_EXIT_CODE)
    oom_code = policy.get("oom_exit_code")
    max_restarts = policy.get("max_restarts", 0)
    limit = policy.get("time_limit_s")
    at_limit = bool(
        terminated and limit and elapsed_s is not None and elapsed_s >= limit - TIME_LIMIT_SLACK_S
    )
    where = _step(latest_step)
    disk_full = next((e for e in reversed(events) if e.get("event") == "disk_full"), None)
    no_intact = next(
        (e for e in reversed(events) if e.get("event") == "no_intact_checkpoint"), None
    )
    oom_event = any(e.get("event") == "oom" for e in events)
    # Every rank saved on the warning signal and exits 75; the first to exit makes srun's
    # --kill-on-bad-exit terminate the others, so the step may report 143: rank 0's event says.
    stopped_event = any(
        e.get("event") == "stopped" and e.get("step") == latest_step for e in events
    )
    hungs = [e for e in events if e.get("event") == "hung"]  # one per rank that fired
    hung = next((e for e in hungs if e.get("suspect_host")), hungs[0] if hungs else None)
    note = "".join(
        f"; note: checkpoint {_step(e.get('step'))} was rejected ({e.get('file')}: "
        f"{e.get('reason')})"
        for e in events
        if e.get("event") == "checkpoint_rejected"
    )

    def verdict(outcome, decision, reason, **extra):
        return dict(outcome=outcome, decision=decision, reason=reason + note, **extra)

    if finished:
        return verdict(
            "finished",
            "stop",
            "finished: the `finished` marker exists; a finished run is never requeued",
        )
    if terminated and not at_limit:
        return verdict(
            "terminated",
            "none",
            f"terminated by the scheduler (exit {exit_code}, latest {where}): SLURM "
            "requeues preempted jobs and jobs on failed nodes itself; a cancelled job "
            "stays cancelled",
        )
    if exit_code == policy.get("disk_full_exit_code", rundir.DISK_FULL_EXIT_CODE) or disk_full:
        d = disk_full or {}
        fs = d.get("filesystem") or "the run directory's filesystem"
        saving = f"step {d['step']}" if d.get("step") is not None else "a checkpoint"
        return verdict(
            "disk_full",
            "stop",
            f"disk full: no space left on {fs} while saving {saving} (exit "
            f"{exit_code}; newest complete checkpoint: {where}); a requeue would fail "
            "the same way; free space, then `resume`",
        )
    if no_intact:
        return verdict(
            "no_checkpoint",
            "stop",
            f"no intact checkpoint: every complete checkpoint was rejected "
            f"({', '.join(no_intact.get('rejected') or []) or '?'}; exit {exit_code}); "
            "the trainer refuses to train from step 0; restore a checkpoint folder "
            "(or delete the *.corrupt folders to start over), then resume",
        )
    if exit_code == requeue_code or stopped_event:
        outcome = "stopped"
    elif at_limit:
        outcome = "timeout"
    elif exit_code == oom_code or oom_event:  # srun reports a peer's kill (143) when one rank OOMs
        outcome = "oom"
    elif exit_code == policy.get("hung_exit_code", rundir.HUNG_EXIT_CODE) or hung:
        outcome = "hung"
    else:
        outcome = "crashed"
    extra = {}
    if outcome == "hung":
        h = hung or {}
        extra = dict(suspect_rank=h.get("suspect_rank"), suspect_host=h.get("suspect_host"))

    if restarts >= max_restarts:
        return verdict(
            outcome,
            "stop",
            f"restart limit: {restarts} restarts >= job.max_restarts {max_restarts} "
            f"(exit {exit_code}, latest {where}); resume to go on",
            **extra,
        )
    if outcome in ("stopped", "timeout"):
        previous = next((a for a in reversed(history) if a.get("decision") == "requeue"), None)
        if previous is not None and previous.get("latest_step") == latest_step:
            return verdict(
                outcome,
                "stop",
                f"no progress: the latest complete checkpoint is still {where}, as at "
                f"the previous requeue (job {previous.get('job_id')} restart "
                f"{previous.get('restart')}); check the logs (does a step fit in the "
                "time limit?), then resume",
            )
        why = "saved on the warning signal" if outcome == "stopped" else "reached the time limit"
        return verdict(
            outcome, "requeue", f"{why} (exit {exit_code}) at {where}; requeued to go on"
        )
    if outcome == "oom":
        return verdict(
            outcome,
            "stop",
            f"out of memory (exit {exit_code}) at {where}: the same job would run out "
            "again; lower trainer.train.micro_batch_size, then resume",
        )
    what = f"crashed (exit {exit_code})"
    if outcome == "hung":
        h = hung or {}
        what = (
            f"hung (exit {exit_code}): rank {h.get('rank', '?')} saw no progress for "
            f"{h.get('waited_s', '?')} s (limit {h.get('limit_s', '?')} s) after step "
            f"{h.get('step', '?')}; suspect rank {h.get('suspect_rank', '?')} on "
            f"{h.get('suspect_host') or '?'}"
        )
    previous = next((a for a in reversed(history) if a.get("outcome") != "terminated"), None)
    if (
        previous is not None
        and previous.get("outcome") in ("crashed", "hung")
        and previous.get("latest_step") == latest_step
    ):
        both = {previous.get("outcome"), outcome}
        twice = (
            f"{outcome} twice" if len(both) == 1 else f"{previous.get('outcome')} then {outcome}"
        )
        hosts = [str(a["suspect_host"]) for a in (previous, extra) if a.get("suspect_host")]
        return verdict(
            outcome,
            "stop",
            f"crash loop: {twice} at {where} (exit codes {previous.get('exit_code')} "
            f"then {exit_code}"
            + (f"; suspect node(s) {', '.join(hosts)}" if hosts else "")
            + "); read the logs, fix the cause, then resume",
            **extra,
        )
    return verdict(
        outcome,
        "requeue",
        f"{what} at {where}; requeued once (a second failure at the same step stops the run)",
        **extra,
    )


def attempt_events(events: list, job_id, restart: int, since: float | None = None) -> list:
    """The records of one attempt: its job id and restart count; outside SLURM (no job id),
    those written since `since` (epoch seconds)."""
    if job_id:
        return [
            e
            for e in events
            if str(e.get("job_id")) == str(job_id) and int(e.get("restart") or 0) == restart
        ]
    if since is None:
        return []
    first = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    return [e for e in events if not e.get("job_id") and str(e.get("time", "")) >= first]


def _history(data: dict, events: list) -> list:
    """submission.json's attempts plus those that only reached events.jsonl (a full disk)."""
    fallback = [e for e in events if e.get("event") == "decision"]
    return sorted(data.get("attempts", []) + fallback, key=lambda a: str(a.get("time", "")))


def _say(line: str) -> bool:
    """One line to the batch log, unbuffered: on a full disk the write fails here (and the
    caller goes on), not in Python's flush at exit, which would turn the exit code into 120."""
    data = (line + "\n").encode(errors="replace")
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # captured (tests)
        print(line, flush=True)
        return True
    for out in (fd, 2):  # stderr: often the same file, but maybe not
        try:
            sys.stdout.flush()
            os.write(out, data)
            return True
        except OSError:
            continue
    return False


def _record(run_dir: Path, attempt: dict) -> str | None:
    """Append the attempt to submission.json; on failure append it to events.jsonl (a short
    line fits where a rewritten record does not) and return what went wrong."""
    try:
        record.add_attempt(run_dir, attempt)
        return None
    except (OSError, ValueError) as e:
        failure = f"{type(e).__name__}: {e}"
    fields = {k: v for k, v in attempt.items() if k not in ("job_id", "restart", "host", "time")}
    rundir.append_event(run_dir, "decision", unrecorded=failure, **fields)
    return failure


def _amend(run_dir: Path, **fields) -> None:
    try:
        record.amend_last_attempt(run_dir, **fields)
    except (OSError, ValueError) as e:
        _say(f"[launcher] could not amend {record.path(run_dir)}: {type(e).__name__}: {e}")


def _load(run_dir: Path) -> dict:
    try:
        return record.load(run_dir)
    except (OSError, ValueError) as e:  # unreadable: decide from what the run directory says
        _say(
            f"[launcher] could not read {record.path(run_dir)} ({type(e).__name__}: {e}); "
            "deciding without its policy and history"
        )
        return {}


def main(argv: list[str] | None = None, environ=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launchers.requeue", description=__doc__.split("\n")[0]
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--exit-code", type=int, required=True, help="the trainer's (srun's) exit code")
    p.add_argument("--elapsed", type=float, default=None, help="seconds the batch script ran")
    p.add_argument("--terminated", action="store_true", help="the batch shell got SIGTERM")
    p.add_argument("--dry-run", action="store_true", help="print the decision; record nothing")
    args = p.parse_args(argv)
    env = os.environ if environ is None else environ

    run_dir = args.run_dir
    data = _load(run_dir)
    job_id = env.get("SLURM_JOB_ID")
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    latest = rundir.latest_complete_step(run_dir)
    events = rundir.read_events(run_dir)
    since = None if args.elapsed is None else time.time() - args.elapsed - 1
    verdict = decide(
        finished=rundir.is_finished(run_dir),
        exit_code=args.exit_code,
        latest_step=latest,
        restarts=restarts,
        policy=data.get("policy", {}),
        history=_history(data, events),
        terminated=args.terminated,
        elapsed_s=args.elapsed,
        events=attempt_events(events, job_id, restarts, since),
    )
    attempt = dict(
        job_id=job_id,
        restart=restarts,
        host=socket.gethostname(),
        exit_code=args.exit_code,
        latest_step=latest,
        **verdict,
    )
    # First the batch log: what is decided must be visible even if nothing else can be written.
    _say(f"{DECISION} {verdict['decision']} -- {verdict['reason']}")
    if args.dry_run:
        return 0
    failure = _record(run_dir, attempt)
    if failure:
        _say(
            f"[launcher] could not record the decision in {record.path(run_dir)}: {failure}; "
            f"`status` shows it from this log (and {rundir.EVENTS} if that could be written)"
        )

    if verdict["decision"] == "requeue":
        if not job_id:
            _say("[launcher] not in a SLURM job: nothing to requeue; stopping")
            _amend(run_dir, decision="stop", reason=verdict["reason"] + "; but not in a SLURM job")
            return 1
        # Requeueing terminates this very job (SIGTERM, then SIGKILL): the record is written;
        # ignore SIGTERM so that a failure of scontrol can still be noted.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            out = subprocess.run(
                ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=120
            )
            failure = None if out.returncode == 0 else (out.stderr or out.stdout).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            failure = str(e)
        if failure:
            _say(f"[launcher] scontrol requeue failed: {failure}")
            _amend(
                run_dir,
                decision="stop",
                reason=verdict["reason"] + "; but scontrol requeue failed: " + failure,
            )
            return args.exit_code or 1
        return 0
    if verdict["outcome"] == "finished":
        return 0
    return _OWN_CODE.get(verdict["outcome"]) or args.exit_code or 1


if __name__ == "__main__":
    sys.exit(main())
