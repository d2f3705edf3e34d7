"""The native SLURM backend: render templates/slurm/train.sbatch.j2, submit it with sbatch.

Python decides every value (launchers/slurm.py: the render context, srun flags, environment,
job name) and the template only places them, through slurm.py's quoting filters and Jinja
environment, which the submitit and NeMo-Run backends share.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from bionemo.rundir import SCRIPT
from launchers import cluster, slurm, sweep
from launchers.backends.base import GONE, Backend, BackendError, Submission
from launchers.spec import JobSpec

TEMPLATE = "slurm/train.sbatch.j2"
SWEEP_TEMPLATE = "slurm/sweep.sbatch.j2"  # a sweep job (launchers/sweep.py)


def render(spec: JobSpec) -> str:
    if spec.config.kind == "sweep":
        return slurm.render(
            SWEEP_TEMPLATE,
            spec,
            sweep_lines=sweep.lines(sweep.command(spec)),
            sweep_summary=sweep.summary(spec),
        )
    return slurm.render(TEMPLATE, spec)


def script_name(kind: str) -> str:
    """The batch script's file in the run directory."""
    return sweep.SCRIPT if kind == "sweep" else SCRIPT


# ------------------------------------------------------------------------------------ SLURM clients


def client_env(saved_cluster: dict, start: bool = False) -> dict[str, str]:
    """Environment for sbatch/squeue/scontrol/scancel. For the bundled cluster: its SLURM_CONF,
    after starting it when `start` and it is down."""
    env = dict(os.environ)
    if saved_cluster.get("bundled"):
        env.update(cluster.slurm_env())
        try:
            if start and not _controller_answers(env) and not cluster.is_up():
                print(
                    "starting the bundled SLURM cluster (launchers/cluster.py) ...",
                    file=sys.stderr,
                    flush=True,
                )
                cluster.up()
        except cluster.ClusterError as e:
            raise BackendError(f"the bundled cluster could not start: {e}") from None
    return env


def _controller_answers(env: dict) -> bool:
    """Fast path for the bundled cluster: its slurm.conf exists and slurmctld accepts a TCP
    connection (well under a millisecond, against ~50 ms for cluster.is_up())."""
    if not Path(env["SLURM_CONF"]).is_file():
        return False
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(0.5)
    try:
        sock.connect((b"127.0.0.1", cluster.CTLD_PORT))  # bytes: no idna codec import
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _run(cmd: list[str], env: dict, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError:
        raise BackendError(f"{cmd[0]} not found: is this a SLURM login node?") from None
    except subprocess.TimeoutExpired:
        raise BackendError(f"{' '.join(cmd)} did not answer within {timeout:.0f} s") from None


def _sbatch(script: Path, env: dict) -> Submission:
    t0 = time.perf_counter()
    out = _run(["sbatch", "--parsable", str(script)], env, cwd=script.parent)
    took = time.perf_counter() - t0
    if out.returncode != 0:
        raise BackendError(f"sbatch refused {script}: {(out.stderr or out.stdout).strip()}")
    job_id = out.stdout.strip().splitlines()[-1].split(";")[0] if out.stdout.strip() else ""
    if not job_id.isdigit():
        raise BackendError(f"sbatch printed no job id: {out.stdout!r} {out.stderr!r}")
    return Submission(job_id=job_id, scheduler_s=took)


_FIELD = re.compile(r"([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|$)")


def parse_record(line: str) -> dict[str, str]:
    """One line of `scontrol show ... -o` as a dict."""
    out: dict[str, str] = {}
    for m in _FIELD.finditer(line.strip()):
        out.setdefault(m.group(1), m.group(2))
    return out


def job_record(job_id: str, env: dict) -> dict[str, str] | None:
    """`scontrol show job -o ID` as a dict; None when the controller no longer knows the job."""
    out = _run(["scontrol", "show", "job", "-o", str(job_id)], env, timeout=30)
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:
            return None
        raise BackendError((out.stderr or out.stdout).strip())
    line = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    return parse_record(line) if line else None


class SbatchBackend(Backend):
    name = "sbatch"

    def files(self, spec: JobSpec) -> dict[str, str]:
        return {script_name(spec.config.kind): render(spec)}

    def describe(self, spec: JobSpec) -> str:
        return render(spec)

    def submit(self, spec: JobSpec) -> Submission:
        env = client_env(spec.cluster.model_dump(), start=True)
        return _sbatch(spec.run_dir / script_name(spec.config.kind), env)

    def resubmit(self, run_dir: Path, saved: dict) -> Submission:
        env = client_env(saved.get("cluster", {}), start=True)
        kind = "sweep" if saved.get("sweep") else "train"
        return _sbatch(Path(run_dir) / script_name(kind), env)

    def states(self, run_dir: Path, saved: dict, job_ids: list[str]) -> dict[str, str]:
        env = client_env(saved.get("cluster", {}))
        states = {}
        for job_id in job_ids:
            try:
                rec = job_record(job_id, env)
            except BackendError as e:
                states[job_id] = f"unknown (scheduler: {e})"
                continue
            if rec is None:
                states[job_id] = f"{GONE} (ended a while ago)"
                continue
            text = rec.get("JobState", "?")
            reason = rec.get("Reason", "None")
            if reason not in ("None", ""):
                text += f" ({reason})"
            text += f", {rec.get('RunTime', '?')} of {rec.get('TimeLimit', '?')}"
            if rec.get("NodeList") not in (None, "", "(null)"):
                text += f" on {rec['NodeList']}"
            text += f", restarts {rec.get('Restarts', '0')}, exit {rec.get('ExitCode', '?')}"
            states[job_id] = text
        return states

    def cancel(self, run_dir: Path, saved: dict, job_ids: list[str]) -> list[str]:
        if not job_ids:
            return []
        env = client_env(saved.get("cluster", {}))
        out = _run(["scancel", *job_ids], env, timeout=60)
        if out.returncode != 0 and "Invalid job id" not in out.stderr:
            raise BackendError(f"scancel failed: {(out.stderr or out.stdout).strip()}")
        return job_ids
