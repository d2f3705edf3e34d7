"""The local backend: run the trainer on this machine, in the foreground (`debug`, BACKEND=local).

One process runs `python -m bionemo.train RUN_DIR`; N > 1 processes run under torchrun
(`python -m torch.distributed.run --standalone --nproc-per-node N -m bionemo.train RUN_DIR`).
Output goes to the terminal and to logs/train-local-<time>.log. The exit code is returned as it
is; nothing is requeued (`resume` continues a stopped run from its checkpoints).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from launchers.backends.base import Backend, BackendError, Submission
from launchers.spec import JobSpec


def command(python: str, nproc: int, run_dir: Path) -> list[str]:
    if nproc == 1:
        return [python, "-m", "bionemo.train", str(run_dir)]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "bionemo.train", str(run_dir)]


def environment(cluster: dict, nproc: int) -> dict[str, str]:
    """This machine's environment plus the profile's; each process gets an equal share of the
    cores unless the profile or the caller set OMP_NUM_THREADS."""
    env = {**os.environ, **cluster.get("env", {})}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _nproc(saved: dict) -> int:
    cl = saved["cluster"]
    per_node = cl.get("gpus_per_node") or cl.get("tasks_per_node") or 1
    return int(saved["job"].get("nodes", 1)) * int(per_node)


def run(saved: dict, run_dir: Path) -> int:
    """Run the trainer in the foreground; return its exit code."""
    cl = saved["cluster"]
    argv = command(cl["python"], _nproc(saved), run_dir)
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"train-local-{time.strftime('%Y%m%dT%H%M%S')}.log"
    print(f"[launcher] {shlex.join(argv)}  (log: {log_path})", flush=True)
    # Ctrl-C reaches the trainer (same process group), which saves and exits 75; we stay to
    # record what happened.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with open(log_path, "ab") as log:
            try:
                proc = subprocess.Popen(argv, cwd=cl["workdir"], env=environment(cl, _nproc(saved)),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            except OSError as e:
                raise BackendError(f"cannot start {argv[0]}: {e}") from None
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
            return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


class LocalBackend(Backend):
    name = "local"

    def describe(self, spec: JobSpec) -> str:
        saved = spec.config.model_dump(mode="json")
        env = {k: v for k, v in environment(saved["cluster"], _nproc(saved)).items()
               if k in saved["cluster"]["env"] or k in ("PYTHONUNBUFFERED", "OMP_NUM_THREADS")}
        argv = command(spec.cluster.python, _nproc(saved), spec.run_dir)
        return (f"cd {shlex.quote(spec.cluster.workdir)} && "
                + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
                + " " + shlex.join(argv) + "\n")

    def submit(self, spec: JobSpec) -> Submission:
        return Submission(job_id=None, exit_code=run(spec.config.model_dump(mode="json"),
                                                     spec.run_dir))

    def resubmit(self, run_dir: Path, saved: dict) -> Submission:
        return Submission(job_id=None, exit_code=run(saved, Path(run_dir)))
