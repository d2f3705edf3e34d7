"""The submitit backend: the run is a submitit `Checkpointable` submitted by an `AutoExecutor`.

(The file is not called submitit.py, which would shadow the package.)

What a submitit user expects, from the same JobSpec the native backend renders:

    executor = make_executor(spec)           # submitit.AutoExecutor(folder=<run>/submitit)
    job = executor.submit(TrainerJob.of(spec))
    job.job_id, job.paths.stdout, job.cancel()

Parameters come from the cluster profile, as the native script's do: nodes, tasks and GPUs per
node, CPUs per task, partition, account, qos, exclusive, time (exact, not rounded to minutes),
`--signal=<stop_signal>@<signal_lead_s>`, `--requeue`, the profile's environment, setup lines and
rendezvous (templates/slurm/submitit_setup.j2, which includes the native script's own partial
_environment.j2), and the srun flags (launchers/slurm.py: CPUs per task, pyxis, cluster.srun_args).

Signals -- how submitit's handler chain and the project's stop protocol share one job
------------------------------------------------------------------------------------
submitit runs `python -m submitit.core._submit FOLDER` in every task and, before calling the
pickled job, installs its handlers there: the warning signal -> `checkpoint_and_try_requeue`
(on global rank 0: call `job.checkpoint()`, dump what it returns as the new pickle, `scontrol
requeue`, exit), SIGTERM -> logged and ignored.

The trainer runs as a *child* of each task (`python -m bionemo.train RUN_DIR`), not in-process:
in-process, bionemo.stop.StopFlag would replace submitit's handler, and a `checkpoint()` called
from a signal handler could not wait for a save that must happen in the very thread it
interrupted. As a child:

1. SLURM's `--signal=USR2@lead` (no `B:`) reaches every process of the step, trainers included;
   `TrainerJob` also forwards the signal (and SIGTERM) to its trainer child, then hands it on to
   submitit's handler. The trainer sets its flag, the ranks agree after the next step, all save,
   rank 0 commits the checkpoint and every rank exits 75 -- the project's stop protocol, unchanged.
2. On global rank 0, submitit's handler calls `TrainerJob.checkpoint()`, which waits for the
   trainer child to exit, then asks `launchers.requeue.decide()` (the same policy as the native
   script: finished marker, restart limit, progress since the last requeue, crash loop, OOM),
   records the attempt in submission.json, and
     - requeue: returns a fresh `DelayedSubmission` of itself -> submitit dumps it and runs
       `scontrol requeue`; the restarted job resumes from the newest complete checkpoint;
     - finished (the signal came during the last step): the job ends COMPLETED;
     - stop: raises `RunStopped(reason)` -> the job ends FAILED with the reason.
   Other ranks only forward the signal; their task returns the trainer's exit code.
   Every rank has written its shards before rank 0 commits (a barrier), so when rank 0's trainer
   has exited the checkpoint is complete for all ranks; requeueing then cannot cut a save short.
3. Without a warning signal (the trainer finished, crashed or ran out of memory, or SIGTERM came:
   preemption, scancel, the limit itself), rank 0's task makes the same decision after the
   trainer exits and, for a requeue, asks submitit's JobEnvironment to requeue the job.

The trainer child is reaped by a thread; the main thread (and the signal handlers that run in it)
only polls an attribute, since Popen.wait holds a non-reentrant lock that a nested wait from a
handler would deadlock on.

A sweep job (`python -m launchers sweep`, launchers/sweep.py) is a `SweepJob` instead: the
allocation is the profile's (nodes x ranks per node), but submitit's srun step is ONE task on the
first node, outside any container, which runs the sweep's orchestrator; the trials are srun steps
of the same job with --overlap. No requeue: a sweep is run again, not resumed. (submitit always
adds `--signal=USR2@<delay>`; near the limit the trials would get it and stop the sweep, which
the time limit would end a minute later anyway.)
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from bionemo import rundir
from launchers import slurm
from launchers.backends.base import Backend, BackendError, Submission
from launchers.spec import JobSpec

FOLDER = "submitit"  # <run_dir>/submitit: submitit's pickles, batch scripts and per-task logs
REQUEUE_EXIT_CODE = rundir.REQUEUE_EXIT_CODE
# slurm_setup, rendered with launchers/slurm.py's environment (quoting filters, StrictUndefined),
# so the environment, setup lines and rendezvous are the native script's own partial
SETUP_TEMPLATE = "slurm/submitit_setup.j2"
SWEEP_SETUP_TEMPLATE = "slurm/submitit_sweep_setup.j2"


# ------------------------------------------------------------------------------------ the job


class RunStopped(RuntimeError):
    """The requeue policy stopped the run (its reason is in submission.json and `status`)."""


class _Finished(Exception):
    """Raised from checkpoint() (inside submitit's handler) when the run turned out finished, to
    unwind into __call__, which then returns normally: the job ends COMPLETED."""


class TrainerJob(Checkpointable):
    """One task of the run: start the trainer, pass the stop signal on, and on global rank 0
    decide (launchers.requeue.decide) whether the job goes on."""

    def __init__(self, run_dir: str, python: str, workdir: str, stop_signal: str = "USR2"):
        self.run_dir, self.python, self.workdir = str(run_dir), python, workdir
        self.stop_signal = stop_signal
        self._reset()

    @classmethod
    def of(cls, spec: JobSpec) -> "TrainerJob":
        return cls(
            str(spec.run_dir),
            spec.cluster.python,
            spec.cluster.workdir,
            spec.trainer.train.stop_signal,
        )

    # pickled state: the four settings; what a running task holds is rebuilt
    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("run_dir", "python", "workdir", "stop_signal")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _reset(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._rc: int | None = None
        self._terminated = False
        self._decided = False
        self._in_checkpoint = False
        self._rank = 0

    def command(self) -> list[str]:
        return [self.python, "-m", "bionemo.train", self.run_dir]

    # -------------------------------------------------------------------- in the task

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        self._rank = env.global_rank
        sig = getattr(signal, f"SIG{self.stop_signal}")
        self._chain(sig)
        self._chain(signal.SIGTERM, terminated=True)
        # the trainer's output goes where submitit sends this task's (<job>_<task>_log.out)
        self._proc = subprocess.Popen(self.command(), cwd=self.workdir)
        threading.Thread(target=self._reap, name="reap-trainer", daemon=True).start()
        try:
            rc = self._wait()
        except _Finished:  # decided in checkpoint(): finished
            return 0
        if self._rank != 0:
            return rc  # rank 0 decides for the job
        # no signal handler may decide while we do
        signal.pthread_sigmask(signal.SIG_BLOCK, {sig, signal.SIGTERM})
        verdict = self._decide(rc, via="submitit task (trainer exited)")
        if verdict["decision"] == "requeue":
            try:
                env._requeue(0)  # submitit's own requeue: scontrol requeue $SLURM_JOB_ID
            except (OSError, subprocess.SubprocessError) as e:
                _amend(
                    self.run_dir,
                    decision="stop",
                    reason=verdict["reason"] + f"; but the requeue failed: {e}",
                )
                raise RunStopped(f"requeue failed: {e}") from None
            sys.exit(-1)  # as submitit's handler does after a requeue: no result pickle
        if verdict["outcome"] == "finished":
            return 0
        raise RunStopped(verdict["reason"])

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Called by submitit's signal handler on global rank 0 when the warning signal comes.
        The trainer saves through the stop protocol (it got the signal too); wait for it, then
        let the project's policy decide. Returning a DelayedSubmission makes submitit requeue."""
        if self._decided:  # the task decided already (the signal came late)
            raise RunStopped("the run's outcome was decided already")
        self._in_checkpoint = True
        rc = self._wait() if self._proc is not None else REQUEUE_EXIT_CODE
        verdict = self._decide(rc, via="submitit checkpoint() (warning signal)")
        if verdict["decision"] == "requeue":
            return DelayedSubmission(
                type(self)(self.run_dir, self.python, self.workdir, self.stop_signal)
            )
        if verdict["outcome"] == "finished":
            raise _Finished()
        raise RunStopped(verdict["reason"])

    # -------------------------------------------------------------------- helpers

    def _chain(self, sig: int, terminated: bool = False) -> None:
        """Pass `sig` to the trainer, then to the handler submitit installed -- except while
        checkpoint() runs: a repeated warning signal must not start a second checkpoint inside
        the first (SLURM may deliver it more than once)."""
        previous = signal.getsignal(sig)

        def handler(signum, frame):
            if terminated:
                self._terminated = True
            self._forward(signum)
            if callable(previous) and not (self._in_checkpoint and not terminated):
                previous(signum, frame)

        signal.signal(sig, handler)

    def _forward(self, signum: int) -> None:
        if self._proc is not None and self._rc is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signum)

    def _reap(self) -> None:
        self._rc = self._proc.wait()

    def _wait(self) -> int:
        while self._rc is None:
            time.sleep(0.2)
        return self._rc

    def _decide(self, exit_code: int, via: str) -> dict:
        self._decided = True
        start = os.environ.get("BIONEMO_BATCH_START")
        elapsed = time.time() - float(start) if start else None
        return decide_and_record(
            self.run_dir, exit_code, terminated=self._terminated, elapsed_s=elapsed, via=via
        )


class SweepFailed(RuntimeError):
    """The sweep's orchestrator exited non-zero (its output is in this task's log)."""


class SweepJob:
    """A sweep job's one task: run the orchestrator (`python -m launchers.sweeping
    --inside-allocation ...`) in the workdir and fail the job when it fails."""

    def __init__(self, command: list[str], workdir: str):
        self.command, self.workdir = list(command), workdir

    @classmethod
    def of(cls, spec: JobSpec) -> "SweepJob":
        from launchers import sweep

        return cls(sweep.command(spec, in_step=True), spec.cluster.workdir)

    def __call__(self) -> int:
        print("[launcher] sweep: " + shlex.join(self.command), flush=True)
        rc = subprocess.run(self.command, cwd=self.workdir).returncode
        if rc:
            raise SweepFailed(f"the sweep exited {rc}")
        return 0


def decide_and_record(run_dir, exit_code: int, *, terminated: bool, elapsed_s, via: str) -> dict:
    """launchers.requeue.decide() on what the run directory and SLURM say, recorded in
    submission.json before anything is requeued (what `python -m launchers.requeue` does for the
    native script, minus the `scontrol requeue`, which submitit runs)."""
    from bionemo import rundir
    from launchers import record, requeue

    data = record.load(run_dir)
    job_id = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    latest = rundir.latest_complete_step(run_dir)
    events = requeue.attempt_events(rundir.read_events(run_dir), job_id, restarts)
    verdict = requeue.decide(
        finished=rundir.is_finished(run_dir),
        exit_code=exit_code,
        latest_step=latest,
        restarts=restarts,
        policy=data.get("policy", {}),
        history=data.get("attempts", []),
        terminated=terminated,
        elapsed_s=elapsed_s,
        events=events,
    )
    # printed first: on a full disk the record below may fail, the log line still says why
    print(f"[launcher] decision: {verdict['decision']} -- {verdict['reason']}", flush=True)
    record.add_attempt(
        run_dir,
        dict(
            job_id=job_id,
            restart=restarts,
            host=socket.gethostname(),
            exit_code=exit_code,
            latest_step=latest,
            via=via,
            **verdict,
        ),
    )
    return verdict


def _amend(run_dir, **fields) -> None:
    from launchers import record

    record.amend_last_attempt(run_dir, **fields)


# ------------------------------------------------------------------------------------ executor


def setup_lines(spec: JobSpec) -> list[str]:
    template = SWEEP_SETUP_TEMPLATE if spec.config.kind == "sweep" else SETUP_TEMPLATE
    return slurm.render(template, spec).rstrip("\n").split("\n")


def _sbatch_arg_pairs(flags: list[str]) -> dict:
    """cluster.sbatch_args (`--mem=0`, `--gres-flags=enforce-binding`, `--overcommit`) as
    submitit's additional_parameters."""
    out = {}
    for flag in flags:
        key, eq, value = flag[2:].partition("=")
        out[key.replace("-", "_")] = value if eq else True
    return out


def parameters(spec: JobSpec) -> dict:
    """AutoExecutor.update_parameters(**...) for the spec (slurm_* are SLURM-only)."""
    cl, job, tr = spec.cluster, spec.job, spec.trainer
    sweeping = spec.config.kind == "sweep"
    extra = _sbatch_arg_pairs(cl.sbatch_args)
    # exact time (timeout_min is whole minutes) and the project's signal (submitit's default
    # is USR2@<signal_delay_s>, the same shape); --requeue so that SLURM requeues preempted jobs
    extra["time"] = spec.time_limit
    if not sweeping:
        extra.update(signal=f"{tr.train.stop_signal}@{cl.signal_lead_s}", requeue=True)
    if job.hold:
        extra["hold"] = True
    params = dict(
        name=slurm.job_name(spec),
        nodes=job.nodes,
        tasks_per_node=spec.tasks_per_node,
        cpus_per_task=cl.cpus_per_task,
        timeout_min=math.ceil(spec.config.time_limit_s / 60),
        stderr_to_stdout=True,
        slurm_partition=cl.partition,
        slurm_account=cl.account,
        slurm_qos=cl.qos,
        slurm_exclusive=True if cl.exclusive else None,
        slurm_constraint=job.constraint,
        slurm_exclude=job.exclude,
        slurm_dependency=job.dependency,
        slurm_signal_delay_s=cl.signal_lead_s,
        slurm_setup=setup_lines(spec),
        slurm_srun_args=(
            _sweep_step_flags(spec) if sweeping else slurm.srun_flags(spec, kill_on_bad_exit=True)
        ),
        slurm_additional_parameters=extra,
    )
    if cl.gpus_per_node:
        params["gpus_per_node"] = cl.gpus_per_node
    return params


def _sweep_step_flags(spec: JobSpec) -> list[str]:
    """submitit's srun step of a sweep: one task on the first node, outside any container (the
    orchestrator calls srun); the trial steps overlap it."""
    return [
        "--nodes=1",
        "--ntasks=1",
        "--ntasks-per-node=1",
        f"--cpus-per-task={spec.cluster.cpus_per_task}",
    ]


@contextlib.contextmanager
def _without_srun_check():
    """submitit's SlurmExecutor refuses to exist where `srun` is not on PATH; `render` (which
    submits nothing) should work on a laptop too."""
    from submitit.slurm.slurm import SlurmExecutor

    original = SlurmExecutor.__dict__["affinity"]
    SlurmExecutor.affinity = classmethod(lambda cls: 1)
    try:
        yield
    finally:
        SlurmExecutor.affinity = original


def make_executor(spec: JobSpec) -> submitit.AutoExecutor:
    """The AutoExecutor of the run: folder <run_dir>/submitit, the profile's interpreter,
    job.max_restarts as submitit's timeout budget (the project's policy decides first)."""
    from launchers import sweep

    python = sweep.orchestrator_python(spec) if spec.config.kind == "sweep" else spec.cluster.python
    ex = submitit.AutoExecutor(
        folder=str(Path(spec.run_dir) / FOLDER),
        cluster="slurm",
        slurm_python=shlex.quote(python),
        slurm_max_num_timeout=spec.job.max_restarts,
    )
    ex.update_parameters(**parameters(spec))
    return ex


def script(spec: JobSpec) -> str:
    """The batch script submitit will submit for the spec (nothing is written)."""
    with _without_srun_check():
        ex = make_executor(spec)._executor
    return ex._make_submission_file_text(ex._submitit_command_str, "render")


def _spec_of(run_dir: Path, saved: dict) -> JobSpec:
    from launchers.config import LaunchConfig

    return JobSpec(LaunchConfig.model_validate(saved), Path(run_dir), (), ())


def _slurm_job(run_dir: Path, job_id: str, tasks: int = 1):
    from submitit.slurm.slurm import SlurmJob

    return SlurmJob(folder=Path(run_dir) / FOLDER, job_id=str(job_id), tasks=tuple(range(tasks)))


@contextlib.contextmanager
def _quiet():
    """Without accounting, sacct (behind submitit's Job.state) complains on stderr and submitit
    logs a warning; scontrol's view is shown anyway."""
    import logging

    log = logging.getLogger("submitit")
    level, saved_fd = log.level, os.dup(2)
    log.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        log.setLevel(level)


def _use_cluster(saved_cluster: dict, start: bool = False) -> None:
    """submitit runs sbatch/scancel/sacct with this process's environment: give it the bundled
    cluster's SLURM_CONF."""
    from launchers.backends import sbatch

    env = sbatch.client_env(saved_cluster, start=start)
    for key in ("SLURM_CONF",):
        if key in env:
            os.environ[key] = env[key]


class SubmititBackend(Backend):
    name = "submitit"

    def describe(self, spec: JobSpec) -> str:
        return script(spec)

    def submit(self, spec: JobSpec) -> Submission:
        _use_cluster(spec.cluster.model_dump(), start=True)
        try:
            executor = make_executor(spec)
            task = SweepJob.of(spec) if spec.config.kind == "sweep" else TrainerJob.of(spec)
            t0 = time.perf_counter()
            job = executor.submit(task)
            took = time.perf_counter() - t0
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            raise BackendError(f"submitit could not submit: {str(e).strip()}") from None
        return Submission(
            job_id=str(job.job_id),
            scheduler_s=0.0,
            notes=[f"submitit folder {job.paths.folder}, submit {took:.3f} s"],
        )

    def resubmit(self, run_dir: Path, saved: dict) -> Submission:
        return self.submit(_spec_of(run_dir, saved))

    def states(self, run_dir: Path, saved: dict, job_ids: list[str]) -> dict[str, str]:
        """scontrol's view (as for the native backend) plus submitit's Job.state (sacct; on a
        cluster without accounting submitit says UNKNOWN, and only scontrol's view is shown)."""
        from launchers.backends.sbatch import SbatchBackend

        states = SbatchBackend().states(run_dir, saved, job_ids)
        _use_cluster(saved.get("cluster", {}))
        for job_id in job_ids:
            try:
                with _quiet():
                    own = _slurm_job(run_dir, job_id).state
            except Exception:  # noqa: BLE001 -- sacct missing or refusing: scontrol's view stands
                own = "UNKNOWN"
            if own and own != "UNKNOWN":
                states[job_id] = f"{states.get(job_id, '?')} (submitit: {own})"
        return states

    def cancel(self, run_dir: Path, saved: dict, job_ids: list[str]) -> list[str]:
        from launchers import record

        _use_cluster(saved.get("cluster", {}))
        for job_id in job_ids:
            try:
                _slurm_job(run_dir, job_id).cancel(check=False)  # scancel through submitit
            except OSError as e:
                raise BackendError(f"scancel failed: {e}") from None
        record.add_event(
            run_dir, "cancel-via", detail="submitit Job.cancel() of job(s) " + ", ".join(job_ids)
        )
        return job_ids

    def log_files(self, run_dir: Path, saved: dict, job_ids: list[str]) -> list[Path]:
        """submitit's per-task logs of the newest job (the trainer's output included)."""
        if not job_ids:
            return []
        cl = saved.get("cluster", {})
        per_node = cl.get("gpus_per_node") or cl.get("tasks_per_node") or 1
        tasks = int(saved.get("job", {}).get("nodes", 1)) * int(per_node)
        if saved.get("sweep"):
            tasks = 1  # the orchestrator's one task
        job = _slurm_job(run_dir, job_ids[-1], tasks)
        paths = [job.task(k).paths.stdout for k in range(tasks)]
        return [p for p in paths if p.exists()]
