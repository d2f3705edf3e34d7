"""The local backend: run the trainer on this machine, in the foreground (`debug`, BACKEND=local).

Each rank is a `python -m bionemo.train RUN_DIR` process started here, with torchrun's variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT a free loopback port) when
there are several. Output goes to the terminal and to logs/train-local-<time>.log.

Why not torchrun: its agent reports any non-zero worker exit as its own exit 1, so a run that
saved on a signal (every rank 75) looked like a crash, as did the trainer's other codes (12, 28,
124); and it terminates the other workers as soon as the first exits non-zero, 75 included, while
rank 0 may still be committing the checkpoint. Here each rank's exit code comes from the OS, and
the run's is the one the ranks agreed on (0 or 75), else the first failure's (128+N for a
signal, as a shell reports it). After a failure the other ranks are told to stop (SIGTERM) and
killed GRACE_S later: they would otherwise wait in a collective for the rank that is gone.

The warning signal and SIGTERM sent to this process are passed on to every rank, which save and
exit 75; Ctrl-C reaches the ranks directly (same process group). Nothing is requeued (`resume`
continues a stopped run from its checkpoints).
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from bionemo.rundir import LOGS, REQUEUE_EXIT_CODE
from launchers import sweep
from launchers.backends.base import Backend, BackendError, Submission
from launchers.sweeping.trials import free_port
from launchers.spec import JobSpec

GRACE_S = 30.0  # after a rank failed, the others get this long to end before SIGKILL (torchrun's)
POLL_S = 0.2  # how often exits are checked while output is copied


def command(python: str, run_dir: Path) -> list[str]:
    """One rank's command line (every rank runs the same)."""
    return [python, "-m", "bionemo.train", str(run_dir)]


def environment(cluster: dict, nproc: int) -> dict[str, str]:
    """This machine's environment plus the profile's; each process gets an equal share of the
    cores unless the profile or the caller set OMP_NUM_THREADS."""
    env = {**os.environ, **cluster.get("env", {})}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def rank_environment(env: dict[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """torchrun's variables for one of several ranks (bionemo.distributed.DistEnv reads them);
    the rendezvous store listens on loopback only."""
    if nproc == 1:
        return env
    return {
        **env,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def exit_code(codes: list[int]) -> int:
    """The run's exit code from its ranks' (in the order they exited): the first failure's, else
    75 when a rank stopped for a requeue, else 0. A signal N is reported as 128+N."""
    for code in codes:
        if code not in (0, REQUEUE_EXIT_CODE):
            return 128 - code if code < 0 else code
    return REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes else 0


def _nproc(saved: dict) -> int:
    cl = saved["cluster"]
    per_node = cl.get("gpus_per_node") or cl.get("tasks_per_node") or 1
    return int(saved["job"].get("nodes", 1)) * int(per_node)


class _Ranks:
    """The running ranks: start, pass signals on, collect exit codes, stop the rest on failure."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], nproc: int):
        port = free_port("127.0.0.1") if nproc > 1 else 0
        read_fd, write_fd = os.pipe()  # one pipe for all ranks: lines arrive whole (< PIPE_BUF)
        self.procs: list[subprocess.Popen] = []
        try:
            for rank in range(nproc):
                self.procs.append(
                    subprocess.Popen(
                        argv,
                        cwd=cwd,
                        env=rank_environment(env, rank, nproc, port),
                        stdout=write_fd,
                        stderr=write_fd,
                    )
                )
        except OSError as e:
            self.signal(signal.SIGKILL)
            os.close(read_fd)
            raise BackendError(f"cannot start {argv[0]}: {e}") from None
        finally:
            os.close(write_fd)
        self.output = read_fd
        self.codes: list[int] = []  # in the order the ranks exited
        self.kill_at: float | None = None

    def signal(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def check(self) -> bool:
        """Note new exits, stop the rest after a failure; True when every rank has exited."""
        for p in self.procs:
            if p.returncode is None and p.poll() is not None:
                self.codes.append(p.returncode)
                if p.returncode not in (0, REQUEUE_EXIT_CODE) and self.kill_at is None:
                    self.signal(signal.SIGTERM)
                    self.kill_at = time.monotonic() + GRACE_S
        if self.kill_at is not None and time.monotonic() > self.kill_at:
            self.signal(signal.SIGKILL)
        return len(self.codes) == len(self.procs)

    def copy_output(self, sink) -> int:
        """Copy the ranks' output to `sink` until every rank has exited; their exit code."""
        while True:
            ready, _, _ = select.select([self.output], [], [], POLL_S)
            chunk = os.read(self.output, 65536) if ready else b""
            if chunk:
                sink(chunk)
            all_exited = self.check()
            if ready and not chunk:
                break  # end of output: every rank closed it
            if all_exited and not ready:
                break  # nothing left to read (a grandchild may still hold the pipe open)
        while not self.check():
            time.sleep(POLL_S)
        os.close(self.output)
        return exit_code(self.codes)


def run(saved: dict, run_dir: Path) -> int:
    """Run the trainer's ranks in the foreground; return the run's exit code (exit_code())."""
    cl, nproc = saved["cluster"], _nproc(saved)
    argv = command(cl["python"], run_dir)
    logs = Path(run_dir) / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"train-local-{time.strftime('%Y%m%dT%H%M%S')}.log"
    ranks = f"{nproc} ranks: " if nproc > 1 else ""
    print(f"[launcher] {ranks}{shlex.join(argv)}  (log: {log_path})", flush=True)
    warning = saved.get("trainer", {}).get("train", {}).get("stop_signal", "USR2")
    forwarded = {signal.SIGTERM, getattr(signal, f"SIG{warning}")}
    previous = {s: signal.getsignal(s) for s in (*forwarded, signal.SIGINT)}
    # Ctrl-C reaches the ranks (same process group), which save and exit; we stay to record it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with open(log_path, "ab") as log:
            ranks = _Ranks(argv, cl["workdir"], environment(cl, nproc), nproc)
            for s in forwarded:
                signal.signal(s, lambda signum, frame: ranks.signal(signum))

            def sink(chunk: bytes) -> None:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)

            return ranks.copy_output(sink)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class LocalBackend(Backend):
    name = "local"

    def describe(self, spec: JobSpec) -> str:
        if spec.config.kind == "sweep":  # the sweep's orchestrator, here (launchers/sweep.py)
            return sweep.describe_local(spec)
        saved = spec.config.model_dump(mode="json")
        nproc = _nproc(saved)
        env = {
            k: v
            for k, v in environment(saved["cluster"], nproc).items()
            if k in saved["cluster"]["env"] or k in ("PYTHONUNBUFFERED", "OMP_NUM_THREADS")
        }
        line = (
            f"cd {shlex.quote(spec.cluster.workdir)} && "
            + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            + " "
            + shlex.join(command(spec.cluster.python, spec.run_dir))
            + "\n"
        )
        if nproc == 1:
            return line
        return (
            f"# {nproc} processes, each with RANK=<0..{nproc - 1}> LOCAL_RANK=<rank> "
            f"WORLD_SIZE={nproc} MASTER_ADDR=127.0.0.1 MASTER_PORT=<a free port>\n" + line
        )

    def submit(self, spec: JobSpec) -> Submission:
        if spec.config.kind == "sweep":
            try:
                return Submission(job_id=None, exit_code=sweep.run_local(spec))
            except OSError as e:
                raise BackendError(f"cannot start {spec.cluster.python}: {e}") from None
        return Submission(
            job_id=None, exit_code=run(spec.config.model_dump(mode="json"), spec.run_dir)
        )

    def resubmit(self, run_dir: Path, saved: dict) -> Submission:
        if saved.get("sweep"):
            raise BackendError(
                "a local sweep is run again, not resumed: start a new one with "
                "`python -m launchers sweep --backend local ...` (make sweep)"
            )
        return Submission(job_id=None, exit_code=run(saved, Path(run_dir)))
