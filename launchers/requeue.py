"""The requeue decision, run by the batch script after the trainer exits.

    python -m launchers.requeue RUN_DIR --exit-code RC [--elapsed S] [--terminated]

Policy, in order (the first rule that applies decides):

1. the `finished` marker exists             -> stop, never requeue
2. the scheduler sent SIGTERM (preemption,  -> leave it to SLURM: it requeues preempted jobs and
   node failure, scancel, scontrol requeue)    jobs on failed nodes itself (--requeue); a
                                               cancelled job stays cancelled
3. restarts (SLURM_RESTART_COUNT) >= job.max_restarts  -> stop
4. exit 75 (the trainer saved on the warning signal), or SIGTERM at the time limit
                                            -> requeue, unless the latest complete checkpoint is
                                               the one of the previous requeue (no progress)
5. out of memory (the trainer's OOM exit code) -> stop: the same job would run out again
6. any other exit (a crash)                 -> requeue once; stop when the previous attempt also
                                               crashed at the same latest checkpoint
                                               ("crashed twice at step N")

Every decision is appended to submission.json (job id, restart, exit code, latest complete step,
decision, reason), recorded *before* `scontrol requeue` runs, because requeueing kills this job.
Stdlib only and no torch: it runs in well under a second on the batch host.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from bionemo import rundir
from launchers import record

REQUEUE_EXIT_CODE = rundir.REQUEUE_EXIT_CODE
TIME_LIMIT_SLACK_S = 30  # SIGTERM this close to the time limit is the time limit


def _step(step) -> str:
    return "no checkpoint yet" if step is None else f"step {step}"


def decide(*, finished: bool, exit_code: int, latest_step, restarts: int, policy: dict,
           history: list, terminated: bool = False, elapsed_s: float | None = None) -> dict:
    """Return {"outcome", "decision", "reason"}; decision is requeue, stop or none."""
    requeue_code = policy.get("requeue_exit_code", REQUEUE_EXIT_CODE)
    oom_code = policy.get("oom_exit_code")
    max_restarts = policy.get("max_restarts", 0)
    limit = policy.get("time_limit_s")
    at_limit = bool(terminated and limit and elapsed_s is not None
                    and elapsed_s >= limit - TIME_LIMIT_SLACK_S)
    where = _step(latest_step)

    if finished:
        return dict(outcome="finished", decision="stop",
                    reason="finished: the `finished` marker exists; a finished run is never "
                           "requeued")
    if terminated and not at_limit:
        return dict(outcome="terminated", decision="none",
                    reason=f"terminated by the scheduler (exit {exit_code}, latest {where}): "
                           "SLURM requeues preempted jobs and jobs on failed nodes itself; a "
                           "cancelled job stays cancelled")
    if exit_code == requeue_code:
        outcome = "stopped"
    elif at_limit:
        outcome = "timeout"
    elif exit_code == oom_code:
        outcome = "oom"
    else:
        outcome = "crashed"

    if restarts >= max_restarts:
        return dict(outcome=outcome, decision="stop",
                    reason=f"restart limit: {restarts} restarts >= job.max_restarts "
                           f"{max_restarts} (exit {exit_code}, latest {where}); resume to go on")
    if outcome in ("stopped", "timeout"):
        previous = next((a for a in reversed(history) if a.get("decision") == "requeue"), None)
        if previous is not None and previous.get("latest_step") == latest_step:
            return dict(outcome=outcome, decision="stop",
                        reason=f"no progress: the latest complete checkpoint is still {where}, "
                               f"as at the previous requeue (job {previous.get('job_id')} "
                               f"restart {previous.get('restart')}); check the logs (does a "
                               "step fit in the time limit?), then resume")
        why = ("saved on the warning signal" if outcome == "stopped"
               else "reached the time limit")
        return dict(outcome=outcome, decision="requeue",
                    reason=f"{why} (exit {exit_code}) at {where}; requeued to go on")
    if outcome == "oom":
        return dict(outcome=outcome, decision="stop",
                    reason=f"out of memory (exit {exit_code}) at {where}: the same job would run "
                           "out again; lower trainer.train.micro_batch_size, then resume")
    previous = next((a for a in reversed(history) if a.get("outcome") != "terminated"), None)
    if (previous is not None and previous.get("outcome") == "crashed"
            and previous.get("latest_step") == latest_step):
        return dict(outcome=outcome, decision="stop",
                    reason=f"crash loop: crashed twice at {where} (exit codes "
                           f"{previous.get('exit_code')} then {exit_code}); read the logs, fix "
                           "the cause, then resume")
    return dict(outcome=outcome, decision="requeue",
                reason=f"crashed (exit {exit_code}) at {where}; requeued once (a second crash "
                       "at the same step stops the run)")


def main(argv: list[str] | None = None, environ=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launchers.requeue",
                                description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--exit-code", type=int, required=True, help="the trainer's (srun's) exit code")
    p.add_argument("--elapsed", type=float, default=None, help="seconds the batch script ran")
    p.add_argument("--terminated", action="store_true", help="the batch shell got SIGTERM")
    p.add_argument("--dry-run", action="store_true", help="print the decision; record nothing")
    args = p.parse_args(argv)
    env = os.environ if environ is None else environ

    run_dir = args.run_dir
    data = record.load(run_dir)
    job_id = env.get("SLURM_JOB_ID")
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    latest = rundir.latest_complete_step(run_dir)
    verdict = decide(finished=rundir.is_finished(run_dir), exit_code=args.exit_code,
                     latest_step=latest, restarts=restarts, policy=data.get("policy", {}),
                     history=data.get("attempts", []), terminated=args.terminated,
                     elapsed_s=args.elapsed)
    attempt = dict(job_id=job_id, restart=restarts, host=socket.gethostname(),
                   exit_code=args.exit_code, latest_step=latest, **verdict)
    print(f"[launcher] decision: {verdict['decision']} -- {verdict['reason']}", flush=True)
    if args.dry_run:
        return 0
    record.add_attempt(run_dir, attempt)

    if verdict["decision"] == "requeue":
        if not job_id:
            record.amend_last_attempt(run_dir, decision="stop",
                                      reason=verdict["reason"] + "; but not in a SLURM job")
            return 1
        # Requeueing terminates this very job (SIGTERM, then SIGKILL): the record is written;
        # ignore SIGTERM so that a failure of scontrol can still be noted.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                                 timeout=120)
            failure = None if out.returncode == 0 else (out.stderr or out.stdout).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            failure = str(e)
        if failure:
            print(f"[launcher] scontrol requeue failed: {failure}", flush=True)
            record.amend_last_attempt(run_dir, decision="stop",
                                      reason=verdict["reason"] + "; but scontrol requeue failed: "
                                      + failure)
            return args.exit_code or 1
        return 0
    if verdict["outcome"] == "finished":
        return 0
    return args.exit_code or 1


if __name__ == "__main__":
    sys.exit(main())
