"""The SLURM vocabulary every SLURM backend shares: quoting, the Jinja environment over templates/,
and the values Python decides for a job (name, environment, srun flags, the render context).

The native script (backends/sbatch.py), submitit's setup lines and srun flags
(backends/submitit_backend.py), NeMo-Run's (backends/nemo_run_backend.py) and the sweep's trial
steps (launchers/sweep.py) all take them from here, so the three backends launch the same job
(tests/test_backends_parity.py). This module imports no backend: it sits below all of them.

Three filters quote values: `q` (shell words, shlex.quote), `sbq` (#SBATCH values, which sbatch
parses itself) and `c` (comments); `qw` quotes a list of words. The environment's `finalize` hook
refuses any other string, so a value that reaches a script unquoted is a render error, not a
latent injection; undefined variables are errors too (StrictUndefined).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import jinja2

from bionemo.rundir import REQUEUE_EXIT_CODE
from launchers.paths import TEMPLATES
from launchers.spec import JobSpec


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
        f"unquoted value {value!r} in the template: pipe it through q, sbq or c"
    )


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
    """The one Jinja environment: templates/ as the loader's root, the quoting filters."""
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


def render(template: str, spec: JobSpec, **extra) -> str:
    """templates/<template> with the job's context (plus `extra` values)."""
    return environment().get_template(template).render(**context(spec), **extra)


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
    """What every SLURM template may use: the header, the environment, the launch, the requeue."""
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
        signal=f"{tr.train.stop_signal}@{cl.signal_lead_s}"
        if spec.config.kind == "train"
        else None,
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
