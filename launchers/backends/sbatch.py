"""The native SLURM backend: render templates/slurm/train.sbatch.j2, submit it with sbatch.

Python decides every value here and hands the template ready-made pieces. Three filters quote
them: `q` (shell words, shlex.quote), `sbq` (#SBATCH values, which sbatch parses itself) and `c`
(comments). The environment's `finalize` hook refuses any other string, so a value that reaches
the script unquoted is a render error, not a latent injection; undefined variables are errors too
(StrictUndefined).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jinja2

from bionemo.config import REQUEUE_EXIT_CODE
from launchers.backends.base import Backend, BackendError, Submission
from launchers.config import REPO_ROOT
from launchers.spec import JobSpec

TEMPLATES = REPO_ROOT / "templates"
TEMPLATE = "slurm/train.sbatch.j2"
SCRIPT = "train.sbatch"  # = bionemo.rundir.SCRIPT
SWEEP_TEMPLATE = "slurm/sweep.sbatch.j2"  # a sweep job (launchers/sweep.py)


# ------------------------------------------------------------------------------------ quoting


class Quoted(str):
    """Text that may be placed into the script as it is."""


class ShellCode(Quoted):
    """Shell code that is meant to run: the cluster profile's `setup` lines, nothing else."""


def _text(value) -> str:
    if value is None or isinstance(value, bool):
        raise jinja2.TemplateError(f"refusing to render {value!r}: decide it in Python")
    return str(value)


def q(value) -> Quoted:
    """One shell word."""
    return Quoted(shlex.quote(_text(value)))


_SBATCH_PLAIN = re.compile(r"^[^\s'\"\\#]+$")


def sbq(value) -> Quoted:
    """An #SBATCH value. sbatch splits these lines itself: whitespace separates, quotes group,
    backslash escapes and an unquoted # starts a comment."""
    text = _text(value)
    if re.search(r"[\x00-\x1f\x7f]", text):
        raise jinja2.TemplateError(f"control character in #SBATCH value {text!r}")
    if _SBATCH_PLAIN.match(text):
        return Quoted(text)
    return Quoted('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')


def qw(words) -> Quoted:
    """Several shell words, each quoted, separated by spaces."""
    return Quoted(" ".join(shlex.quote(_text(w)) for w in words))


def c(value) -> Quoted:
    """Text inside a comment: one line."""
    return Quoted(re.sub(r"[\x00-\x1f\x7f]", "?", _text(value)))


def _finalize(value):
    if isinstance(value, Quoted):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise jinja2.TemplateError(
        f"unquoted value {value!r} in the template: pipe it through q, sbq or c")


_ENV: jinja2.Environment | None = None


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Compiled templates are cached (keyed by source checksum): rendering is then ~10x faster,
    which is most of `submit`'s own time after Python's imports."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = root / "bionemo-hpc" / "jinja"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return jinja2.FileSystemBytecodeCache(str(folder))


def environment() -> jinja2.Environment:
    global _ENV
    if _ENV is None:
        _ENV = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)),
            bytecode_cache=_bytecode_cache(),
            undefined=jinja2.StrictUndefined,
            finalize=_finalize,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            autoescape=False,
        )
        _ENV.filters.update(q=q, sbq=sbq, c=c, qw=qw)
    return _ENV


# ------------------------------------------------------------------------------------ decisions


def job_name(spec: JobSpec) -> str:
    """What squeue shows: experiment.run with anything unusual replaced."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{spec.job.experiment}.{spec.job.run}")[:128]


def environment_lines(spec: JobSpec) -> list[tuple[str, str]]:
    """The profile's variables, plus unbuffered output and a bounded thread count unless the
    profile chose otherwise."""
    env = dict(spec.cluster.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(spec.cluster.cpus_per_task))
    return list(env.items())


def srun_flags(spec: JobSpec, kill_on_bad_exit: bool = False) -> list[str]:
    """The step's flags. kill_on_bad_exit (training steps): when one rank exits non-zero, srun
    sends the others SIGTERM (SIGKILL after KillWait), so a rank that dies before or during the
    rendezvous does not leave the rest waiting and the requeue decision runs within seconds. It
    cuts no save short: every rank returns from a save only after its final barrier, when rank 0
    has committed it. A sweep's trials go without (docs/sweep.md: the OOM rank's exit 12)."""
    cl = spec.cluster
    flags = [
        f"--nodes={spec.job.nodes}",
        f"--ntasks-per-node={spec.tasks_per_node}",
        # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05)
        f"--cpus-per-task={cl.cpus_per_task}",
    ]
    if cl.container_image:  # pyxis
        flags.append(f"--container-image={cl.container_image}")
        if cl.container_mounts:
            flags.append(f"--container-mounts={','.join(cl.container_mounts)}")
        flags.append(f"--container-workdir={cl.container_workdir or cl.workdir}")
    if kill_on_bad_exit:
        flags.append("--kill-on-bad-exit=1")
    flags += cl.srun_args  # last: the profile's own flags win
    return flags


def context(spec: JobSpec) -> dict:
    job, cl, tr = spec.job, spec.cluster, spec.trainer
    run_dir = str(spec.run_dir)
    return dict(
        run_dir=run_dir,
        model=job.model,
        cluster_name=cl.name,
        nodes=job.nodes,
        tasks_per_node=spec.tasks_per_node,
        world_size=spec.world_size,
        # header
        job_name=job_name(spec),
        gpus_per_node=cl.gpus_per_node,
        cpus_per_task=cl.cpus_per_task,
        time_limit=spec.time_limit,
        partition=cl.partition,
        account=cl.account,
        qos=cl.qos,
        exclusive=cl.exclusive,
        batch_log=f"{run_dir}/logs/slurm-%j.out",
        # a training job saves on the warning signal and requeues itself; a sweep does neither
        requeue=spec.config.kind == "train",
        signal=f"{tr.train.stop_signal}@{cl.signal_lead_s}" if spec.config.kind == "train" else None,
        dependency=job.dependency,
        constraint=job.constraint,
        exclude=job.exclude,
        hold=job.hold,
        sbatch_args=list(cl.sbatch_args),
        # body
        workdir=cl.workdir,
        host_python=cl.host_python,
        train_python=cl.python,
        env=environment_lines(spec),
        setup=[ShellCode(line) for line in cl.setup],
        srun_flags=srun_flags(spec, kill_on_bad_exit=True),
        stop_signal=tr.train.stop_signal,
        signal_lead_s=cl.signal_lead_s,
        requeue_exit_code=REQUEUE_EXIT_CODE,
    )


def sweep_context(spec: JobSpec) -> dict:
    from launchers import sweep

    return dict(context(spec), sweep_lines=sweep.lines(sweep.command(spec)),
                sweep_summary=sweep.summary(spec))


def render(spec: JobSpec) -> str:
    if spec.config.kind == "sweep":
        return environment().get_template(SWEEP_TEMPLATE).render(**sweep_context(spec))
    return environment().get_template(TEMPLATE).render(**context(spec))


def script_name(kind: str) -> str:
    """The batch script's file in the run directory."""
    if kind == "sweep":
        from launchers import sweep

        return sweep.SCRIPT
    return SCRIPT


# ------------------------------------------------------------------------------------ SLURM clients


def client_env(saved_cluster: dict, start: bool = False) -> dict[str, str]:
    """Environment for sbatch/squeue/scontrol/scancel. For the bundled cluster: its SLURM_CONF,
    after starting it when `start` and it is down."""
    env = dict(os.environ)
    if saved_cluster.get("bundled"):
        from launchers import cluster

        env.update(cluster.slurm_env())
        try:
            if start and not _controller_answers(env) and not cluster.is_up():
                print("starting the bundled SLURM cluster (launchers/cluster.py) ...",
                      file=sys.stderr, flush=True)
                cluster.up()
        except cluster.ClusterError as e:
            raise BackendError(f"the bundled cluster could not start: {e}") from None
    return env


def _controller_answers(env: dict) -> bool:
    """Fast path for the bundled cluster: its slurm.conf exists and slurmctld accepts a TCP
    connection (well under a millisecond, against ~50 ms for cluster.is_up())."""
    import socket

    from launchers import cluster

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
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
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
                states[job_id] = "gone from the controller (ended a while ago)"
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
