"""Commands that resolve a job and hand it to a backend: render, submit, recipe, sweep, debug,
resume. Every check runs before the run directory is written (configuration errors exit 2 with
`<file>: <key>: <problem>; <fix>`); a scheduler's refusal after that exits 1 and says how to
resume.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bionemo import rundir
from bionemo.rundir import OOM_EXIT_CODE, REQUEUE_EXIT_CODE
from launchers import backends, config, recipe, record, runs, sweep
from launchers import spec as specs
from launchers.backends import sbatch
from launchers.commands import echo, error, find_run, load_saved, warn
from launchers.config import CONFIGS, ConfigError, _src, run_names

# when `python -m launchers` started (launchers/__main__.py moves it there): submit records
# its own time since then in submission.json
STARTED = [time.perf_counter()]


def _resolve(args, extra_layers=(), extra_overrides=()):
    return config.resolve(
        model=args.model,
        cluster=args.cluster,
        nodes=args.nodes,
        backend=getattr(args, "backend", None),
        config_files=args.config or [],
        overrides=list(extra_overrides) + list(args.overrides),
        extra_layers=extra_layers,
        options=getattr(args, "options", ()),
        kind=getattr(args, "kind", "train"),
    )


def _write_run_dir(spec, backend, files: dict[str, str], default_run: bool = False):
    """Create the run directory (one mkdir, never over an existing one) and write what the run
    needs. A default name that a concurrent submit created first gives way to the next of
    config.run_names(), rendered again; returns the spec of the directory written."""
    parent = spec.run_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for name in run_names(spec.job.run) if default_run else [spec.job.run]:
            try:
                (parent / name).mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise ConfigError(
                "command line",
                "job.run",
                f"{spec.run_dir} exists already",
                f"continue it with `python -m launchers resume {spec.run_dir}`",
            )
    except OSError as e:  # spec.build checked the folders; this is what changed since
        raise ConfigError(
            "resolved config",
            "cluster.runs_root",
            f"cannot create a run directory in {parent} ({e.strerror})",
            "point cluster.runs_root at a directory you can write",
        ) from None
    if name != spec.job.run:
        spec.config.job.run = name
        spec = dataclasses.replace(spec, run_dir=parent / name)
        files = backend.files(spec)
    (spec.run_dir / rundir.LOGS).mkdir()
    _write_files(spec, files)
    return spec


SINFO_TIMEOUT_S = 3  # sinfo answers in ~5 ms; a controller slower than this gets a warning


def _check_partition(spec, origins) -> None:
    """A SLURM job larger than its partition pends forever, and one for a partition the cluster
    lacks is refused by sbatch after the run directory is written: ask `sinfo` once (~5 ms) and
    refuse both before anything is written. Where sinfo gives no answer (no SLURM client here,
    NeMo-Run's SSH tunnel to another host, a slow controller), warn that nothing was checked."""
    if spec.job.backend not in backends.SCHEDULED:
        return
    unchecked = f"job.nodes {spec.job.nodes} is not checked against the partition's size"
    if spec.job.backend == "nemo_run":
        from launchers.backends.nemo_run_backend import SSH_ENV  # its runs only (see backends)

        if os.environ.get(SSH_ENV):
            return warn(f"{unchecked}: the cluster is behind {SSH_ENV}'s SSH tunnel")
    env = sbatch.client_env(spec.cluster.model_dump(), start=True)
    try:
        out = subprocess.run(
            ["sinfo", "--noheader", "--all", "--format=%P %D"],
            env=env,
            capture_output=True,
            text=True,
            timeout=SINFO_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return warn(f"{unchecked} (sinfo: {e})")
    sizes: dict[str, int] = {}  # partition -> nodes (sinfo prints a line per node state)
    default = None
    for line in out.stdout.splitlines():
        name, _, count = line.strip().rpartition(" ")
        if name.endswith("*"):
            name = default = name[:-1]
        if name and count.isdigit():
            sizes[name] = sizes.get(name, 0) + int(count)
    if out.returncode or not sizes:
        return warn(f"{unchecked} (sinfo: {(out.stderr or out.stdout).strip() or 'no output'})")
    wanted = spec.cluster.partition.split(",") if spec.cluster.partition else [default]
    unknown = [p for p in wanted if p not in sizes]
    if unknown:
        raise ConfigError(
            _src(origins, ("cluster", "partition")),
            "cluster.partition",
            f"{unknown[0] or '(default)'} is not a partition of this cluster",
            "choose one of " + ", ".join(sizes),
        )
    largest = max(sizes[p] for p in wanted)
    if spec.job.nodes > largest:
        raise ConfigError(
            _src(origins, ("job", "nodes")),
            "job.nodes",
            f"{spec.job.nodes} nodes, but partition {','.join(wanted)} has "
            f"{largest}: the job would wait forever",
            f"use --nodes {largest} or fewer, or another cluster.partition",
        )


LOCAL_RANKS_PER_CPU = 4  # a local run may oversubscribe the cores (CI runs 3 ranks on 2) ...
LOCAL_RANKS_MIN = 8  # ... but each rank is a process with the model: a typo must not fork-bomb


def _check_local_ranks(spec, origins) -> None:
    """A local run starts every rank as a process here (debug, BACKEND=local): refuse a count
    this machine cannot hold before anything is written."""
    if spec.job.backend != "local" or spec.config.kind == "sweep":
        return
    cpus = os.cpu_count() or 1
    most = max(LOCAL_RANKS_MIN, LOCAL_RANKS_PER_CPU * cpus)
    ranks = spec.config.world_size
    if ranks > most:
        # (a local run has one node: spec.build refuses more)
        key = ("cluster", "gpus_per_node" if spec.cluster.gpus_per_node else "tasks_per_node")
        raise ConfigError(
            _src(origins, key),
            ".".join(key),
            f"{ranks} ranks would start as processes on this machine, which has {cpus} CPUs",
            f"use at most {most} ranks here (--nproc, --nodes), or submit to a cluster "
            "(BACKEND=sbatch)",
        )


PLUGIN_CHECK_TIMEOUT_S = 10  # a bare interpreter finds a module in ~50 ms
# Finds a module without running it: the top-level package through every finder (editable
# installs bring their own), submodules through the path finder. Executing the plugin would
# import torch (seconds, and the launcher stays torch-free) and run user code on the login node.
_FIND_MODULE = """
import importlib.machinery, importlib.util, sys
parts = sys.argv[1].split(".")
spec = importlib.util.find_spec(parts[0])
for i in range(1, len(parts)):
    if spec is None or spec.submodule_search_locations is None:
        sys.exit(f"{'.'.join(parts[:i])} is not a package" if spec
                 else f"no module named {parts[0]!r}")
    spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i + 1]),
                                                   spec.submodule_search_locations)
sys.exit(0 if spec else f"no module named {sys.argv[1]!r}")
"""


def _check_plugin(spec, origins, strict: bool = True) -> None:
    """trainer.model.plugin's module must be found by the trainer's interpreter, with the job's
    environment (cluster.env, e.g. PYTHONPATH) in its working directory: ask that interpreter in
    a subprocess. Whether the module defines the factory is checked by the trainer when it
    builds the model (bionemo/models/__init__.py), with an error naming the key."""
    plugin = spec.trainer.model.plugin
    if not plugin:
        return
    key, module = "trainer.model.plugin", plugin.partition(":")[0]
    cl = spec.cluster
    if cl.container_image:
        return warn(
            f"{key}: {module} is not checked here: the trainer imports it inside the "
            "container image, which must hold it"
        )
    try:
        done = subprocess.run(
            [cl.python, "-c", _FIND_MODULE, module],
            cwd=cl.workdir,
            env={**os.environ, **cl.env},
            capture_output=True,
            text=True,
            timeout=PLUGIN_CHECK_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return warn(f"{key}: {module} is not checked ({cl.python}: {e})")
    if done.returncode == 0:
        return
    why = (done.stderr.strip().splitlines() or ["no answer"])[-1]
    err = ConfigError(
        _src(origins, ("trainer", "model", "plugin")),
        key,
        f"{cl.python} cannot import {module} ({why})",
        "install the package into that environment (pip install -e ...) or add "
        "its folder to cluster.env.PYTHONPATH",
    )
    if strict:
        raise err
    warn(str(err))


def _write_files(spec, files: dict[str, str]) -> None:
    (spec.run_dir / rundir.CONFIG).write_text(spec.config_text())
    for name, text in files.items():
        (spec.run_dir / name).write_text(text)
        if text.startswith("#!"):
            (spec.run_dir / name).chmod(0o755)


def _policy(cfg) -> dict:
    return dict(
        max_restarts=cfg.job.max_restarts,
        time_limit_s=cfg.time_limit_s,
        signal_lead_s=cfg.cluster.signal_lead_s,
        requeue_exit_code=REQUEUE_EXIT_CODE,
        oom_exit_code=OOM_EXIT_CODE,
    )


def _run_local_attempt(run_dir: Path, submission, command: str) -> int:
    """Record a local run's outcome (nothing is requeued locally)."""
    rc = submission.exit_code
    finished = rundir.is_finished(run_dir)
    latest = rundir.latest_complete_step(run_dir)
    if finished:
        reason = "finished"
    elif rc == REQUEUE_EXIT_CODE:
        reason = f"stopped and saved at step {latest}; `resume {run_dir}` continues it"
    else:
        reason = f"exited {rc} at step {latest} (local backend: nothing is requeued)"
    record.add_attempt(
        run_dir,
        dict(
            job_id=None,
            restart=0,
            exit_code=rc,
            latest_step=latest,
            outcome="finished" if finished else "local",
            decision="none",
            reason=reason,
            command=command,
        ),
    )
    echo(f"[launcher] {reason}")
    return rc


# ------------------------------------------------------------------------------------ commands


def cmd_render(args) -> int:
    resolved = _resolve(args)
    spec = specs.build(resolved, strict=False)
    _check_plugin(spec, resolved.origins, strict=False)
    backend = backends.get(spec.job.backend)
    text = backend.describe(spec)
    for w in spec.warnings:
        warn(w)
    what = {
        "sbatch": f"{spec.config.kind}.sbatch",
        "submitit": "submitit's batch script",
        "nemo_run": "NeMo-Run's batch script",
    }.get(spec.job.backend, "command")
    echo(f"# ==== {what} (dry run: nothing written, nothing submitted) ====")
    echo(text.rstrip("\n"))
    echo(f"# ==== config.yaml -> {spec.run_dir}/config.yaml ====")
    echo(spec.config_text().rstrip("\n"))
    return 0


def cmd_submit(args, extra_layers=(), extra_overrides=(), command="submit") -> int:
    resolved = _resolve(args, extra_layers, extra_overrides)
    spec = specs.build(resolved, strict=True)
    _check_plugin(spec, resolved.origins)
    backend = backends.get(spec.job.backend)
    files = backend.files(spec)  # render before anything is written
    _check_partition(spec, resolved.origins)
    _check_local_ranks(spec, resolved.origins)
    for w in spec.warnings:
        warn(w)
    spec = _write_run_dir(spec, backend, files, resolved.default_run)
    record.create(
        spec.run_dir,
        backend=backend.name,
        cluster=spec.cluster.name,
        policy=_policy(spec.config),
        kind=spec.config.kind,
    )
    t_ready = time.perf_counter()
    try:
        sub = backend.submit(spec)
    except backends.BackendError as e:
        record.add_event(spec.run_dir, "submit-failed", detail=str(e))
        error(
            f"{e}\nthe run directory {spec.run_dir} is written; fix the problem, then "
            f"`python -m launchers resume {spec.run_dir}`"
        )
        return 1
    if sub.job_id is None:  # local backend: it ran in the foreground
        record.add_job(spec.run_dir, None, command)
        if spec.config.kind == "sweep":
            return _local_sweep_done(spec, sub.exit_code)
        return _run_local_attempt(spec.run_dir, sub, command)
    total = time.perf_counter() - STARTED[0]
    # seconds since `python -m launchers` started (imports included, interpreter start-up not)
    record.add_job(
        spec.run_dir,
        sub.job_id,
        command,
        timings=dict(
            launcher_s=round(total - sub.scheduler_s, 4),
            scheduler_s=round(sub.scheduler_s, 4),
            before_submit_s=round(t_ready - STARTED[0], 4),
        ),
    )
    echo(f"submitted job {sub.job_id}: {spec.run_dir}")
    echo(f"  status: make status RUN={spec.run_dir}   logs: make logs RUN={spec.run_dir}")
    if spec.config.kind == "sweep":
        echo(
            f"  results: {spec.config.sweep.out}/<gpu>/{sweep.model_name(spec)}.md, copied to "
            f"{spec.run_dir / sweep.RESULTS}"
        )
    return 0


def _local_sweep_done(spec, rc: int) -> int:
    """Record a local sweep's outcome (a sweep is run again, never resumed)."""
    where = f"{spec.config.sweep.out}/<gpu>/{sweep.model_name(spec)}.md"
    reason = (
        f"sweep finished: results in {where}, copied to {spec.run_dir / sweep.RESULTS}"
        if rc == 0
        else f"sweep exited {rc} (its log is in {spec.run_dir / rundir.LOGS})"
    )
    record.add_attempt(
        spec.run_dir,
        dict(
            job_id=None,
            restart=0,
            exit_code=rc,
            latest_step=None,
            outcome="finished" if rc == 0 else "local",
            decision="none",
            reason=reason,
            command="sweep",
        ),
    )
    echo(f"[launcher] {reason}")
    return rc


def cmd_recipe(args) -> int:
    """Resolve as submit would, and write every key with the layer that set it (recipe.py)."""
    resolved = _resolve(args)
    spec = specs.build(resolved, strict=False)  # host problems are warnings, as for render
    _check_plugin(spec, resolved.origins, strict=False)
    words = [
        w
        for flag in ("model", "cluster", "nodes", "backend")
        if getattr(args, flag) is not None
        for w in (f"--{flag}", str(getattr(args, flag)))
    ]
    words += [w for f in args.config or [] for w in ("--config", f)] + list(args.overrides)
    command = shlex.join(["python", "-m", "launchers", "recipe", *words])
    text = recipe.text(resolved, command)
    for w in [*spec.warnings, *recipe.warnings(resolved)]:
        warn(w)
    if args.out is None or args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(
            "command line",
            "--out",
            f"{out} exists already",
            "choose another --out, or pass --force to replace it",
        )
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(out)  # whole or absent
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(
            "command line", "--out", f"cannot write {out} ({e.strerror})", "choose a writable path"
        ) from None
    echo(
        f"wrote {out}: edit it, then `python -m launchers submit --config {out}` "
        f"(make submit CONFIG={out})"
    )
    return 0


# The sweep's options and the keys they set: (flag, key, help). The only place they are
# declared: launchers/cli.py adds them, launchers/sweep.py hands the keys to the orchestrator.
SWEEP_OPTIONS = (
    (
        "--gpus-per-trial",
        "sweep.gpus_per_trial",
        "ranks (GPUs) per node of each trial; default: the profile's ranks per node",
    ),
    ("--tp", "trainer.parallel.tensor", "tensor-parallel size of the trials"),
    ("--memory-cap-gib", "trainer.train.memory_cap_gib", "cap each trial's GPU memory (GiB)"),
    ("--min", "sweep.min", "smallest micro batch to try (default 1)"),
    ("--max", "sweep.max", "largest micro batch to try (default 512)"),
    ("--warmup-steps", "sweep.warmup_steps", "steps dropped before timing (default 3)"),
    ("--steps", "sweep.steps", "timed steps per trial (default 10)"),
    ("--recompute", "sweep.recompute", "policies to sweep, e.g. none,selective (default all)"),
    (
        "--strategy",
        "sweep.strategies",
        "data-parallel strategies to search, e.g. ddp,fsdp (default: the config's)",
    ),
    ("--fp8", "sweep.fp8", "FP8 recipes to search, e.g. none,tensorwise (default: the config's)"),
    ("--gpu-name", "sweep.gpu_name", "results and table name, e.g. h100_80gb (default detected)"),
    (
        "--cpu-memory-limit-gib",
        "sweep.cpu_memory_limit_gib",
        "CPU trials: address-space limit of every trial process (GiB)",
    ),
    ("--trial-timeout", "sweep.trial_timeout_s", "seconds before a trial counts as hung"),
    ("--out", "sweep.out", "results folder, relative to the workdir (default benchmarks/results)"),
    ("--tables", "sweep.tables", "benchmark tables for --write-table (default configs/benchmarks)"),
)


def cmd_sweep(args) -> int:
    """`python -m launchers sweep` and `make sweep` (with or without BACKEND; without, the local
    backend runs the sweep here): one grammar, SWEEP_OPTIONS plus the launcher's own."""
    args.kind = "sweep"
    if args.backend == "local" and args.nodes is None:
        args.nodes = 1  # trials on this machine; the profile's job.nodes is for SLURM jobs
    args.options = [
        (flag, key, getattr(args, flag[2:].replace("-", "_"))) for flag, key, _ in SWEEP_OPTIONS
    ]
    args.options += [
        ("--compile", "trainer.train.compile", args.compile),
        ("--write-table", "sweep.write_table", args.write_table or None),
    ]
    if args.dry_run:
        return cmd_render(args)
    return cmd_submit(args, command="sweep")


def cmd_debug(args) -> int:
    args.backend = None
    args.options = [("--nproc", "cluster.tasks_per_node", args.nproc)]
    return cmd_submit(args, extra_layers=[CONFIGS / "debug.yaml"], command="debug")


_LIVE = runs.LIVE  # scheduler states of a job that has not ended


def cmd_resume(args) -> int:
    run_dir = find_run(args.run)
    saved = load_saved(run_dir)
    resolved = config.resolve(
        base=saved, overrides=args.overrides, kind="sweep" if saved.get("sweep") else "train"
    )
    for key in ("experiment", "run"):
        if getattr(resolved.config.job, key) != saved.get("job", {}).get(key):
            raise ConfigError(
                "command line", f"job.{key}", "cannot change on resume", "submit a new run instead"
            )
    spec = specs.build(resolved, strict=True, existing=True)
    _check_plugin(spec, resolved.origins)
    if spec.run_dir.resolve() != run_dir.resolve():
        raise ConfigError(
            "command line",
            "cluster.runs_root",
            "cannot change on resume",
            f"the run lives in {run_dir}",
        )
    backend = backends.get(spec.job.backend)
    data = record.load(run_dir)
    ids = record.job_ids(data)
    if backend.name in backends.SCHEDULED and ids:
        state = backend.states(run_dir, saved, ids[-1:]).get(ids[-1], "")
        if state.split(" ")[0].split(",")[0] in _LIVE:
            raise ConfigError(
                "command line",
                "RUN",
                f"job {ids[-1]} of this run is {state}",
                f"wait for it or `python -m launchers cancel {run_dir}` first",
            )
    files = backend.files(spec)
    _check_partition(spec, resolved.origins)
    for w in spec.warnings:
        warn(w)
    _write_files(spec, files)
    if not data.get("policy"):
        record.create(
            run_dir, backend=backend.name, cluster=spec.cluster.name, policy=_policy(spec.config)
        )
    else:
        record.update(
            run_dir, lambda d: d.update(policy=_policy(spec.config), backend=backend.name)
        )
    if args.overrides:
        record.add_event(run_dir, "resume-overrides", detail=" ".join(args.overrides))
    try:
        sub = backend.resubmit(run_dir, spec.config.model_dump(mode="json"))
    except backends.BackendError as e:
        record.add_event(run_dir, "resume-failed", detail=str(e))
        error(str(e))
        return 1
    record.add_job(run_dir, sub.job_id, "resume")
    if sub.job_id is None:
        return _run_local_attempt(run_dir, sub, "resume")
    echo(f"resubmitted {run_dir} as job {sub.job_id}; it continues from its latest checkpoint")
    return 0
