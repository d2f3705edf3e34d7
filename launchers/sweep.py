"""The sweep job kind: what `python -m launchers sweep` runs, in an allocation or here.

A sweep job starts the sweep's orchestrator (launchers/sweeping/, `python -m launchers.sweeping`)
ONCE; in a SLURM allocation (--inside-allocation) it starts every trial as an srun step of the
same job (launchers/sweeping/trials.py: launch_srun), never a job of its own. Python decides the
orchestrator's command line here, from the resolved config (job, cluster, trainer and sweep
sections), and each backend places it:

    sbatch     sweep.sbatch (templates/slurm/sweep.sbatch.j2) runs it in the batch shell
    submitit   a one-task srun step on the first node runs it (SweepJob)
    nemo_run   NeMo-Run's one-task srun step on the first node runs it
    local      run_local() runs it here, in the foreground; trials are processes of this machine

In the last two the orchestrator is itself in a job step, whose CPUs the trial steps must share:
they get --overlap (without it SLURM holds each trial step until the orchestrator's step ends,
i.e. for ever). The orchestrator runs outside any container (it calls srun, which a container
does not have): cluster.python without a container, cluster.host_python with one. The trials run
cluster.python with every backend's srun flags (launchers/slurm.py: CPUs per task, pyxis,
cluster.srun_args).

Outputs: trials in <run_dir>/trials/<gpu>/<model>/, the results in <sweep.out>/<gpu>/ (by default
the checkout's benchmarks/results, as for a sweep run by hand) and a copy in <run_dir>/results/.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bionemo import rundir
from launchers.slurm import srun_flags
from launchers.sweeping import MODULE

SCRIPT = "sweep.sbatch"  # the sbatch backend's batch script of a sweep run
TRIALS = "trials"  # <run_dir>/trials: the trials' run directories
RESULTS = "results"  # <run_dir>/results: a copy of the result files

# srun flags the sweep decides itself for each trial (from --nodes and --gpus-per-trial)
_SWEEP_SETS = ("--nodes=", "--ntasks-per-node=", "--ntasks=")


def model_name(spec) -> str:
    """The name results are filed under: the preset's name (or the preset file's stem)."""
    return Path(spec.job.model).stem


def orchestrator_python(spec) -> str:
    cl = spec.cluster
    return cl.host_python if cl.container_image else cl.python


def trial_srun_flags(spec, in_step: bool) -> list[str]:
    """Flags for every trial's srun step besides its nodes and tasks."""
    flags = [f for f in srun_flags(spec) if not f.startswith(_SWEEP_SETS)]
    if in_step:
        flags.append("--overlap")
    return flags


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def command(spec, in_step: bool = False) -> list[str]:
    """The orchestrator's command line (words, unquoted). in_step: the orchestrator runs in a job
    step of its own (submitit, NeMo-Run), so the trials need --overlap. With the local backend
    the trials are processes of this machine: no --inside-allocation, no srun flags."""
    sw, tr, run = spec.config.sweep, spec.trainer, Path(spec.run_dir)
    local = spec.job.backend == "local"
    words = [
        orchestrator_python(spec),
        "-m",
        MODULE,
        *([] if local else ["--inside-allocation"]),
        "--model",
        model_name(spec),
        "--base-config",
        str(run / rundir.CONFIG),
        "--nodes",
        str(spec.job.nodes),
        "--gpus-per-trial",
        str(sw.gpus_per_trial),
        "--tp",
        str(tr.parallel.tensor),
        "--min",
        str(sw.min),
        "--max",
        str(sw.max),
        "--warmup-steps",
        str(sw.warmup_steps),
        "--steps",
        str(sw.steps),
        "--recompute",
        ",".join(sw.recompute),
        "--compile" if tr.train.compile else "--no-compile",
        "--trial-timeout",
        _num(sw.trial_timeout_s),
        "--out",
        sw.out,
        "--tables",
        sw.tables,
        "--work-dir",
        str(run / TRIALS),
        "--copy-results",
        str(run / RESULTS),
        "--python",
        spec.cluster.python,
    ]
    if sw.strategies:
        words += ["--strategy", ",".join(sw.strategies)]
    if sw.fp8:
        words += ["--fp8", ",".join(sw.fp8)]
    if tr.train.memory_cap_gib is not None:
        words += ["--memory-cap-gib", _num(tr.train.memory_cap_gib)]
    if sw.gpu_name:
        words += ["--gpu-name", sw.gpu_name]
    if sw.cpu_memory_limit_gib is not None:
        words += ["--cpu-memory-limit-gib", _num(sw.cpu_memory_limit_gib)]
    if sw.write_table:
        words.append("--write-table")
    if not local:
        words += [f"--srun-arg={flag}" for flag in trial_srun_flags(spec, in_step)]
    return words


def lines(words: list[str]) -> list[list[str]]:
    """The command in lines for the script: the program, then one option (and its value) per
    line."""
    head = 4 if words[3] == "--inside-allocation" else 3
    out = [words[:head]]  # python -m launchers.sweeping [--inside-allocation]
    for word in words[head:]:
        if word.startswith("--") or len(out[-1]) != 1 or not out[-1][0].startswith("--"):
            out.append([word])
        else:
            out[-1].append(word)
    return out


def summary(spec) -> str:
    """One line for the script's head and for `render`."""
    sw = spec.config.sweep
    return (
        f"micro batch {sw.min}..{sw.max}, recompute {','.join(sw.recompute)}, trials of "
        f"{spec.job.nodes} node(s) x {sw.gpus_per_trial} rank(s)"
    )


def describe_local(spec) -> str:
    """What the local backend runs (for `render` and `sweep --dry-run`)."""
    cl = spec.cluster
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in cl.env.items())
    return (
        f"# the sweep here ({summary(spec)}), trials in {Path(spec.run_dir) / TRIALS}\n"
        f"cd {shlex.quote(cl.workdir)} && {env + ' ' if env else ''}"
        + " \\\n    ".join(shlex.join(line) for line in lines(command(spec)))
        + "\n"
    )


def run_local(spec) -> int:
    """Run the orchestrator here, in the foreground; its output goes to the terminal and to
    logs/sweep-local-<time>.log. Returns its exit code (0, 1 a failed trial, 2 bad input);
    OSError when cluster.python cannot be started."""
    words = command(spec)
    log_path = (
        Path(spec.run_dir) / rundir.LOGS / f"sweep-local-{time.strftime('%Y%m%dT%H%M%S')}.log"
    )
    print(f"[launcher] {shlex.join(words)}  (log: {log_path})", flush=True)
    env = {**os.environ, **spec.cluster.env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            words,
            cwd=spec.cluster.workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
        return proc.wait()
