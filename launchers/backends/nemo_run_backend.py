"""The NeMo-Run backend: the run is a NeMo-Run `Experiment` with one task on `run.SlurmExecutor`.

What a NeMo user expects, from the same JobSpec the native backend renders:

    executor = make_executor(spec, run)       # run.SlurmExecutor(tunnel=run.LocalTunnel(), ...)
    with run.Experiment(title, executor=executor) as exp:
        exp.add(trainer_script(spec, run), name="train")
        exp.run(detach=True)
    run.Experiment.from_id(exp_id).status() / .cancel("train") / .logs("train")

NEMORUN_HOME is the run's own `<run_dir>/nemo-run/` (experiments, NeMo-Run's job table), so a run
directory holds everything about it; query it with

    export NEMORUN_HOME=<run_dir>/nemo-run
    python -c "import nemo_run as run; run.Experiment.from_id('<id>').status()"

(the id is in submission.json, key `nemo_run`, and in `status`). (Not `nemo_run/`: NeMo-Run rewrites every "/nemo_run" in a script without a container into the job
directory, so no path of the run may contain that string; submit refuses one that does.)

Shell quoting. NeMo-Run 0.11 builds shell command lines from paths under the run directory
without quoting them: `mkdir -p <job_dir>/code` (SlurmExecutor.package, run through invoke's
shell at submit time), `sbatch ... <job_dir>/<name>_sbatch.sh`, `ls -1 <log pattern>` (logs),
and `srun --output <run_dir>/logs/log-...` in the batch script (a `noquote` word, so that
${SLURM_RESTART_COUNT} expands). The same strings are also used as file names in Python, so no
quoting applied here could be right for both uses. The launcher therefore refuses, at validation
(launchers/config/schema.py NEMO_RUN_WORD: exit 2 naming the key, nothing written), a run directory
(cluster.runs_root, job.experiment, job.run) that is not one plain shell word. Everything else
reaches NeMo-Run quoted by us or by it, or already plain: srun flags (cluster.srun_args,
container image/mounts, workdir: NeMo-Run writes them unquoted, although its code looks as if it
quoted them, so make_executor quotes each), #SBATCH values (shlex-quoted by NeMo-Run;
partition/account/qos/constraint/exclude/dependency/sbatch_args are validated words), the job
name (slurm.job_name: [A-Za-z0-9._-]), the setup lines (rendered with launchers/slurm.py's
quoting filters: cluster.env values, workdir, python) and the trainer command (quoted below).
NeMo-Run's own `export KEY=value` lines are not used (the executor gets no env_vars).

Mapping:
- resources: nodes, `ntasks_per_node` = one task per GPU (or cluster.tasks_per_node without
  GPUs), GPUs per node, CPUs per task, partition, account, qos, exclusive, time (exact),
  `signal=<stop_signal>@<signal_lead_s>` (no `B:`: every rank gets it), `#SBATCH --requeue`;
  srun flags: the native backend's (launchers/slurm.py: CPUs per task, pyxis,
  `--kill-on-bad-exit=1`, which NeMo-Run passes too, cluster.srun_args), then `--chdir=<workdir>`
  (NeMo-Run's default is its empty code dir).
- tunnel: `run.LocalTunnel()` on the login node; `run.SSHTunnel` when BIONEMO_NEMO_RUN_SSH is
  `user@host` (a workstation; the run directory is mirrored to the same path there).
- packager: `run.Packager()` -- no packaging: the nodes run cluster.workdir, the checkout on the
  shared filesystem, as with the native backend. NeMo-Run's default GitArchivePackager needs a git
  repository, ships `git archive HEAD` (uncommitted changes silently missing) and extracts a copy
  per experiment.
- launcher: none -- srun starts one trainer per GPU, which reads SLURM_PROCID/SLURM_NTASKS (no
  torchrun).
- retries: the project's requeue policy replaces NeMo-Run's. NeMo-Run's template requeues after
  ANY non-zero exit while `TORCHX_MAX_RETRIES > SLURM_RESTART_COUNT`; that would requeue a crash
  loop and an out-of-memory exit until the limit, and its shell dies at the SIGTERM of the time
  limit without a decision. So `retries=0` switches that rule off, and job.max_restarts is the
  restart limit of launchers/requeue.py (rule 3), which decides exactly as for the native script.
- template: NeMo-Run's own sbatch template cannot express the project's signal and requeue rules,
  so its `setup_lines` hook receives templates/slurm/nemo_run_setup.j2, rendered with
  launchers/slurm.py's environment (quoting filters): the native script's partials
  _environment.j2 (environment, setup lines, rendezvous) and _requeue.j2, the latter installed as
  an EXIT trap that runs after NeMo-Run's srun with its exit code, plus a SIGTERM trap (the batch
  shell notes SIGTERM and waits for srun).

A sweep job (`python -m launchers sweep`, launchers/sweep.py) has one task, `sweep`: NeMo-Run's
srun step is ONE task on the first node (srun flags --nodes=1 --ntasks=1, after NeMo-Run's own),
outside any container, running `python -m launchers.sweeping --inside-allocation ...`; the trials
are srun steps of the same job with --overlap. The allocation is the profile's; no warning
signal, no requeue trap (a sweep is run again, not resumed), retries=0.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from bionemo import rundir
from launchers import slurm
from launchers.backends.base import Backend, BackendError, Submission
from launchers.spec import JobSpec

HOME = "nemo-run"  # <run_dir>/nemo-run: the run's NEMORUN_HOME
TASK = "train"  # the experiment's task name
SSH_ENV = "BIONEMO_NEMO_RUN_SSH"  # user@host of a remote login node -> run.SSHTunnel
SSH_KEY_ENV = "BIONEMO_NEMO_RUN_SSH_IDENTITY"  # optional key file for it
_FORBIDDEN = "/nemo_run"

# NeMo-Run's setup_lines, rendered with launchers/slurm.py's environment (quoting filters)
SETUP_TEMPLATE = "slurm/nemo_run_setup.j2"
SWEEP_SETUP_TEMPLATE = "slurm/nemo_run_sweep_setup.j2"


# ------------------------------------------------------------------------------------ NeMo-Run


def home_of(run_dir) -> Path:
    return Path(run_dir) / HOME


def nemo_run(home: str | Path):
    """Import nemo_run with NEMORUN_HOME = `home` (it reads the variable at import; the job
    table's path is fixed then, so it is set again here for a process that imported it before)."""
    home = str(home)
    os.environ["NEMORUN_HOME"] = home
    try:
        import nemo_run as run
        from nemo_run.run.torchx_backend.schedulers import slurm as scheduler
    except ImportError as e:
        raise BackendError(
            f"nemo_run is not importable ({e}); install nemo_run==0.11.1 with "
            "leptonai<0.47 (see docs/launcher.md, Backends)"
        ) from None
    run.config.set_nemorun_home(home)
    scheduler.SLURM_JOB_DIRS = os.path.join(home, ".slurm_jobs")
    return run


def _quiet_logging():
    import logging

    for name in ("nemo_run", "torchx"):
        logging.getLogger(name).setLevel(logging.ERROR)


SWEEP_TASK = "sweep"


def setup_lines(spec: JobSpec) -> str:
    template = SWEEP_SETUP_TEMPLATE if spec.config.kind == "sweep" else SETUP_TEMPLATE
    return slurm.render(template, spec).rstrip("\n")


def task_name(kind: str) -> str:
    return SWEEP_TASK if kind == "sweep" else TASK


def _sbatch_arg_pairs(flags: list[str]) -> dict:
    out = {}
    for flag in flags:
        key, eq, value = flag[2:].partition("=")
        out[key.replace("-", "_")] = value if eq else True
    return out


def tunnel(spec: JobSpec, run):
    target = os.environ.get(SSH_ENV)
    if not target:
        return run.LocalTunnel(job_dir="")  # "": NEMORUN_HOME/experiments, i.e. the run's own
    user, _, host = target.rpartition("@")
    return run.SSHTunnel(
        host=host,
        user=user or os.environ.get("USER", ""),
        job_dir=str(home_of(spec.run_dir) / "experiments"),
        identity=os.environ.get(SSH_KEY_ENV),
    )


def make_executor(spec: JobSpec, run):
    """run.SlurmExecutor for the spec (see the module docstring for the mapping)."""
    from nemo_run.core.execution.slurm import SlurmJobDetails

    cl, job, tr = spec.cluster, spec.job, spec.trainer
    sweeping = spec.config.kind == "sweep"
    extra = _sbatch_arg_pairs(cl.sbatch_args)
    if not sweeping:
        extra["requeue"] = True
    if job.dependency:
        extra["dependency"] = job.dependency
    if job.hold:
        extra["hold"] = True
    if sweeping:  # the orchestrator: one task on the first node, outside any container
        srun_args = [
            "--nodes=1",
            "--ntasks=1",
            "--ntasks-per-node=1",
            f"--cpus-per-task={cl.cpus_per_task}",
            "--kill-on-bad-exit=0",
            f"--chdir={cl.workdir}",
        ]
    else:
        srun_args = slurm.srun_flags(spec, kill_on_bad_exit=True)
        if not cl.container_image:
            srun_args.append(f"--chdir={cl.workdir}")
    name = slurm.job_name(spec)
    return run.SlurmExecutor(
        account=cl.account,
        partition=cl.partition,
        qos=cl.qos,
        job_name_prefix=f"{name}.",
        time=spec.time_limit,
        nodes=job.nodes,
        ntasks_per_node=spec.tasks_per_node,  # srun: one task per GPU
        gpus_per_node=cl.gpus_per_node or None,
        cpus_per_task=cl.cpus_per_task,
        exclusive=True if cl.exclusive else None,
        constraint=job.constraint,
        exclude=job.exclude,
        signal=None if sweeping else f"{tr.train.stop_signal}@{cl.signal_lead_s}",
        open_mode="append",
        additional_parameters=extra,
        # NeMo-Run 0.11 joins srun words unquoted (its `noquote` is an alias of str, so its
        # "quote unless noquote" quotes nothing): quote each flag once here.
        srun_args=[shlex.quote(flag) for flag in srun_args],
        setup_lines=setup_lines(spec),
        tunnel=tunnel(spec, run),
        packager=run.Packager(),
        retries=0,  # the project's policy decides (see the module docstring)
        job_details=SlurmJobDetails(job_name=name, folder=str(Path(spec.run_dir) / rundir.LOGS)),
        poll_estimated_start_time=False,
    )


def trainer_script(spec: JobSpec, run):
    """`python -m bionemo.train RUN_DIR` as a NeMo-Run Script (NeMo-Run joins the words of the
    command with spaces, so they are quoted here)."""
    return run.Script(
        path="bionemo.train",
        m=True,
        args=[shlex.quote(str(spec.run_dir))],
        entrypoint=shlex.quote(spec.cluster.python),
    )


def sweep_script(spec: JobSpec, run):
    """`python -m launchers.sweeping --inside-allocation ...` (launchers/sweep.py) as a Script."""
    from launchers import sweep

    words = sweep.command(spec, in_step=True)
    assert words[1:3] == ["-m", sweep.MODULE], words
    return run.Script(
        path=sweep.MODULE,
        m=True,
        args=[shlex.quote(w) for w in words[3:]],
        entrypoint=shlex.quote(words[0]),
    )


def task_script(spec: JobSpec, run):
    return sweep_script(spec, run) if spec.config.kind == "sweep" else trainer_script(spec, run)


def _check_paths(spec: JobSpec, home: Path) -> None:
    from launchers.config import NEMO_RUN_WORD

    cl = spec.cluster
    if not NEMO_RUN_WORD.match(str(home)):  # validation refuses this first (module docstring)
        raise BackendError(
            f"NEMORUN_HOME {str(home)!r} is not a plain shell word, and NeMo-Run "
            "puts it into shell commands unquoted; rename the run or use "
            "--backend sbatch"
        )
    texts = {
        "the run directory": str(spec.run_dir),
        "cluster.workdir": cl.workdir,
        "cluster.python": cl.python,
        "NEMORUN_HOME": str(home),
        "the environment or setup lines": setup_lines(spec),
        "cluster.srun_args": " ".join(cl.srun_args),
    }
    for what, text in texts.items():
        if _FORBIDDEN in text:
            raise BackendError(
                f"{what} contains {_FORBIDDEN!r}, which NeMo-Run rewrites in batch scripts "
                "without a container; rename it (e.g. the experiment or runs_root) or use "
                "--backend sbatch"
            )


def _use_cluster(saved_cluster: dict, start: bool = False) -> None:
    """NeMo-Run's LocalTunnel runs sbatch/scancel/sacct with this process's environment."""
    from launchers.backends import sbatch

    env = sbatch.client_env(saved_cluster, start=start)
    if "SLURM_CONF" in env:
        os.environ["SLURM_CONF"] = env["SLURM_CONF"]


def _experiment(run, spec: JobSpec, executor):
    return run.Experiment(
        slurm.job_name(spec),
        executor=executor,
        log_level="ERROR",
        clean_mode=True,
        enable_goodbye_message=False,
        skip_status_at_exit=True,
    )


def script(spec: JobSpec) -> str:
    """The batch script NeMo-Run generates for the spec: a dry run of the experiment in a
    throw-away NEMORUN_HOME (nothing is written to the run directory, nothing submitted)."""
    tmp = tempfile.mkdtemp(prefix="bionemo-nemo-render-")
    previous = os.environ.get("NEMORUN_HOME")
    try:
        run = nemo_run(tmp)
        _quiet_logging()
        with _no_stdin(), _experiment(run, spec, make_executor(spec, run)) as exp:
            exp.add(task_script(spec, run), name=task_name(spec.config.kind))
            exp.dryrun(log=False, delete_exp_dir=False)
            found = sorted(Path(exp._exp_dir).glob("*_sbatch.sh"))
            if not found:
                raise BackendError("NeMo-Run's dry run wrote no batch script")
            return found[0].read_text()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if previous is None:
            os.environ.pop("NEMORUN_HOME", None)
        else:
            os.environ["NEMORUN_HOME"] = previous


def _mirror_to_remote(spec: JobSpec, tun) -> None:
    """SSHTunnel: the run directory must exist where the nodes look (same path)."""
    run_dir = str(spec.run_dir)
    tun.connect()
    tun.run(f"mkdir -p {shlex.quote(run_dir)}/logs")
    for name in (rundir.CONFIG, rundir.SUBMISSION):
        tun.put(str(Path(run_dir) / name), f"{run_dir}/{name}")


def _handles(run_dir) -> dict:
    from launchers import record

    return record.load(run_dir).get("nemo_run", {})


def _spec_of(run_dir: Path, saved: dict) -> JobSpec:
    from launchers.config import LaunchConfig

    return JobSpec(LaunchConfig.model_validate(saved), Path(run_dir), (), ())


class NemoRunBackend(Backend):
    name = "nemo_run"

    def files(self, spec: JobSpec) -> dict[str, str]:
        _check_paths(spec, home_of(spec.run_dir))  # before the run directory is written
        return {}

    def describe(self, spec: JobSpec) -> str:
        _check_paths(spec, home_of(spec.run_dir))
        return script(spec)

    def submit(self, spec: JobSpec) -> Submission:
        from launchers import record

        home = home_of(spec.run_dir)
        _check_paths(spec, home)
        _use_cluster(spec.cluster.model_dump(), start=True)
        run = nemo_run(home)
        _quiet_logging()
        try:
            with _no_stdin():
                executor = make_executor(spec, run)
                if os.environ.get(SSH_ENV):
                    _mirror_to_remote(spec, executor.tunnel)
                with _experiment(run, spec, executor) as exp:
                    exp.add(task_script(spec, run), name=task_name(spec.config.kind))
                    t0 = time.perf_counter()
                    exp.run(detach=True)
                    took = time.perf_counter() - t0
                    handle = exp.jobs[0].handle
                    exp_id = exp._id
        except BackendError:
            raise
        except Exception as e:  # noqa: BLE001 -- NeMo-Run/invoke raise many kinds; show the text
            raise BackendError(f"NeMo-Run could not submit: {str(e).strip()}") from None
        job_id = handle.rpartition("/")[2] if handle else ""
        if not job_id.isdigit():
            raise BackendError(f"NeMo-Run returned no SLURM job id (handle {handle!r})")
        task = task_name(spec.config.kind)
        record.update(
            spec.run_dir,
            lambda d: d.setdefault("nemo_run", {}).update(
                {job_id: dict(experiment=exp_id, task=task, handle=handle, home=str(home))}
            ),
        )
        return Submission(job_id=job_id, notes=[f"NeMo-Run experiment {exp_id}, {took:.3f} s"])

    def resubmit(self, run_dir: Path, saved: dict) -> Submission:
        return self.submit(_spec_of(run_dir, saved))

    def _experiment_of(self, run_dir: Path, job_id: str):
        handle = _handles(run_dir).get(str(job_id))
        if not handle:
            return None, None
        run = nemo_run(handle["home"])
        _quiet_logging()
        return run, run.Experiment.from_id(handle["experiment"])

    def states(self, run_dir: Path, saved: dict, job_ids: list[str]) -> dict[str, str]:
        """scontrol's view (as for the native backend) plus the NeMo-Run experiment's view of
        its task (AppState, from sacct: UNKNOWN on a cluster without accounting)."""
        from launchers.backends.sbatch import SbatchBackend

        states = SbatchBackend().states(run_dir, saved, job_ids)
        _use_cluster(saved.get("cluster", {}))
        for job_id in job_ids:
            try:
                _, exp = self._experiment_of(run_dir, job_id)
                if exp is None:
                    continue
                task = _handles(run_dir).get(str(job_id), {}).get("task", TASK)
                with _silenced(), _no_stdin():
                    own = exp.status(return_dict=True)[task]["status"]
                own = str(getattr(own, "name", own))
                seen = "" if own == "UNKNOWN" else f": {own}"  # UNKNOWN: no accounting (sacct)
                states[job_id] = f"{states.get(job_id, '?')} (NeMo-Run experiment {exp._id}{seen})"
            except Exception:  # noqa: BLE001 -- the handle is extra; scontrol's view stands
                pass
        return states

    def cancel(self, run_dir: Path, saved: dict, job_ids: list[str]) -> list[str]:
        """Experiment.cancel(task) through NeMo-Run; scancel for what it left running."""
        from launchers.backends.sbatch import SbatchBackend

        from launchers import record

        _use_cluster(saved.get("cluster", {}))
        leftover, via = [], []
        for job_id in job_ids:
            try:
                _, exp = self._experiment_of(run_dir, job_id)
            except Exception:  # noqa: BLE001 -- no handle: scancel below
                exp = None
            if exp is None:
                leftover.append(job_id)
                continue
            task = _handles(run_dir).get(str(job_id), {}).get("task", TASK)
            with _silenced(), _no_stdin():
                exp.cancel(task)
            state = SbatchBackend().states(run_dir, saved, [job_id])[job_id]
            if state.split(",")[0].split(" ")[0] in (
                "PENDING",
                "RUNNING",
                "REQUEUED",
                "CONFIGURING",
                "SUSPENDED",
            ):
                leftover.append(job_id)
            else:
                via.append(f"{job_id}: Experiment.cancel({task!r}) of {exp._id}")
        if leftover:
            SbatchBackend().cancel(run_dir, saved, leftover)
            via += [f"{job_id}: scancel" for job_id in leftover]
        record.add_event(run_dir, "cancel-via", detail="; ".join(via))
        return job_ids

    def log_files(self, run_dir: Path, saved: dict, job_ids: list[str]) -> list[Path]:
        """NeMo-Run's logs of the newest job, in <run_dir>/logs (job_details.folder):
        sbatch_<name>_<job>.out (batch script) and log-<name>_<job>_<restart>.out (the ranks)."""
        if not job_ids:
            return []
        logs = Path(run_dir) / rundir.LOGS
        job_id = job_ids[-1]
        batch = sorted(logs.glob(f"sbatch_*_{job_id}.out"))
        ranks = sorted(logs.glob(f"log-*_{job_id}_*.out"), key=lambda p: p.stat().st_mtime)
        return batch[-1:] + ranks[-1:]


@contextlib.contextmanager
def _no_stdin():
    """NeMo-Run runs sbatch, scancel, mkdir... through invoke, which mirrors this process's stdin
    into them by default; nothing here is interactive."""
    import sys

    saved = sys.stdin
    with open(os.devnull) as null:
        sys.stdin = null
        try:
            yield
        finally:
            sys.stdin = saved


@contextlib.contextmanager
def _silenced():
    """NeMo-Run prints through rich consoles and loggers; `status` prints its own lines."""
    import io
    import sys

    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
