"""`python -m launchers COMMAND ...`: the front door (the Makefile's targets call it).

    submit  resolve + validate the config, write the run directory, submit it
    render  dry run: print the batch script and the resolved config; write and submit nothing
    sweep   submit a micro-batch sweep that runs inside ONE allocation (--dry-run: print it)
    debug   run the trainer here, in the foreground: one process, sample data, ~50 steps
    recipe  write the resolved config as an editable, commented file (submit --config FILE runs it)
    status  backend, job ids, scheduler state, latest checkpoint, last requeue decision
    logs    print (or follow, -f) the run's newest logs
    cancel  cancel the run's jobs
    resume  submit an existing run directory again; it continues from its checkpoints
    list    every run under a runs root: backend, state, latest checkpoint, last decision
    plot    the run's loss and throughput plots (<run>/plots/*.png)
    cluster up|down|status: the bundled local SLURM cluster

Configuration errors exit 2 with one line per problem (`<file>: <key>: <problem>; <fix>`) and no
traceback; scheduler errors exit 1. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from launchers import record, runs
from launchers.config import CONFIGS, REPO_ROOT, ConfigError

_T0 = [time.perf_counter()]  # main() moves it to the start of `python -m launchers`


# ------------------------------------------------------------------------------------ helpers


def _out(text: str = "") -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    for line in str(text).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr, flush=True)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _resolve(args, extra_layers=(), extra_overrides=()):
    from launchers import config

    return config.resolve(
        model=args.model, cluster=args.cluster, nodes=args.nodes,
        backend=getattr(args, "backend", None), config_files=args.config or [],
        overrides=list(extra_overrides) + list(args.overrides), extra_layers=extra_layers,
        options=getattr(args, "options", ()), kind=getattr(args, "kind", "train"),
    )


def _write_run_dir(spec, backend, files: dict[str, str], default_run: bool = False):
    """Create the run directory (one mkdir, never over an existing one) and write what the run
    needs. A default name that a concurrent submit created first gives way to the next of
    config.run_names(), rendered again; returns the spec of the directory written."""
    import dataclasses

    from bionemo import rundir
    from launchers.config import run_names

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
            raise ConfigError("command line", "job.run", f"{spec.run_dir} exists already",
                              f"continue it with `python -m launchers resume {spec.run_dir}`")
    except OSError as e:  # spec.build checked the folders; this is what changed since
        raise ConfigError("resolved config", "cluster.runs_root", f"cannot create a run "
                          f"directory in {parent} ({e.strerror})",
                          "point cluster.runs_root at a directory you can write") from None
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
    import subprocess

    from launchers import backends
    from launchers.config import _src

    if spec.job.backend not in backends.SCHEDULED:
        return
    unchecked = f"job.nodes {spec.job.nodes} is not checked against the partition's size"
    if spec.job.backend == "nemo_run":
        from launchers.backends.nemo_run_backend import SSH_ENV

        if os.environ.get(SSH_ENV):
            return _warn(f"{unchecked}: the cluster is behind {SSH_ENV}'s SSH tunnel")
    from launchers.backends import sbatch

    env = sbatch.client_env(spec.cluster.model_dump(), start=True)
    try:
        out = subprocess.run(["sinfo", "--noheader", "--all", "--format=%P %D"], env=env,
                             capture_output=True, text=True, timeout=SINFO_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return _warn(f"{unchecked} (sinfo: {e})")
    sizes: dict[str, int] = {}  # partition -> nodes (sinfo prints a line per node state)
    default = None
    for line in out.stdout.splitlines():
        name, _, count = line.strip().rpartition(" ")
        if name.endswith("*"):
            name = default = name[:-1]
        if name and count.isdigit():
            sizes[name] = sizes.get(name, 0) + int(count)
    if out.returncode or not sizes:
        return _warn(f"{unchecked} (sinfo: {(out.stderr or out.stdout).strip() or 'no output'})")
    wanted = spec.cluster.partition.split(",") if spec.cluster.partition else [default]
    unknown = [p for p in wanted if p not in sizes]
    if unknown:
        raise ConfigError(_src(origins, ("cluster", "partition")), "cluster.partition",
                          f"{unknown[0] or '(default)'} is not a partition of this cluster",
                          "choose one of " + ", ".join(sizes))
    largest = max(sizes[p] for p in wanted)
    if spec.job.nodes > largest:
        raise ConfigError(_src(origins, ("job", "nodes")), "job.nodes",
                          f"{spec.job.nodes} nodes, but partition {','.join(wanted)} has "
                          f"{largest}: the job would wait forever",
                          f"use --nodes {largest} or fewer, or another cluster.partition")


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
    import subprocess

    from launchers.config import _src

    plugin = spec.trainer.model.plugin
    if not plugin:
        return
    key, module = "trainer.model.plugin", plugin.partition(":")[0]
    cl = spec.cluster
    if cl.container_image:
        return _warn(f"{key}: {module} is not checked here: the trainer imports it inside the "
                     "container image, which must hold it")
    try:
        done = subprocess.run([cl.python, "-c", _FIND_MODULE, module], cwd=cl.workdir,
                              env={**os.environ, **cl.env}, capture_output=True, text=True,
                              timeout=PLUGIN_CHECK_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return _warn(f"{key}: {module} is not checked ({cl.python}: {e})")
    if done.returncode == 0:
        return
    why = (done.stderr.strip().splitlines() or ["no answer"])[-1]
    err = ConfigError(_src(origins, ("trainer", "model", "plugin")), key,
                      f"{cl.python} cannot import {module} ({why})",
                      "install the package into that environment (pip install -e ...) or add "
                      "its folder to cluster.env.PYTHONPATH")
    if strict:
        raise err
    _warn(str(err))


def _write_files(spec, files: dict[str, str]) -> None:
    from bionemo import rundir

    (spec.run_dir / rundir.CONFIG).write_text(spec.config_text())
    for name, text in files.items():
        (spec.run_dir / name).write_text(text)
        if text.startswith("#!"):
            (spec.run_dir / name).chmod(0o755)


def _policy(cfg) -> dict:
    from bionemo.config import OOM_EXIT_CODE, REQUEUE_EXIT_CODE

    return dict(max_restarts=cfg.job.max_restarts, time_limit_s=cfg.time_limit_s,
                signal_lead_s=cfg.cluster.signal_lead_s, requeue_exit_code=REQUEUE_EXIT_CODE,
                oom_exit_code=OOM_EXIT_CODE)


def _run_local_attempt(run_dir: Path, submission, command: str) -> int:
    """Record a local run's outcome (nothing is requeued locally)."""
    from bionemo import rundir
    from bionemo.config import REQUEUE_EXIT_CODE

    rc = submission.exit_code
    finished = rundir.is_finished(run_dir)
    latest = rundir.latest_complete_step(run_dir)
    if finished:
        reason = "finished"
    elif rc == REQUEUE_EXIT_CODE:
        reason = f"stopped and saved at step {latest}; `resume {run_dir}` continues it"
    else:
        reason = f"exited {rc} at step {latest} (local backend: nothing is requeued)"
    record.add_attempt(run_dir, dict(job_id=None, restart=0, exit_code=rc, latest_step=latest,
                                     outcome="finished" if finished else "local",
                                     decision="none", reason=reason, command=command))
    _out(f"[launcher] {reason}")
    return rc


# ------------------------------------------------------------------------------------ commands


def cmd_render(args) -> int:
    from launchers import backends
    from launchers import spec as specs

    resolved = _resolve(args)
    spec = specs.build(resolved, strict=False)
    _check_plugin(spec, resolved.origins, strict=False)
    backend = backends.get(spec.job.backend)
    text = backend.describe(spec)
    for w in spec.warnings:
        _warn(w)
    what = {"sbatch": f"{spec.config.kind}.sbatch", "submitit": "submitit's batch script",
            "nemo_run": "NeMo-Run's batch script"}.get(spec.job.backend, "command")
    _out(f"# ==== {what} (dry run: nothing written, nothing submitted) ====")
    _out(text.rstrip("\n"))
    _out(f"# ==== config.yaml -> {spec.run_dir}/config.yaml ====")
    _out(spec.config_text().rstrip("\n"))
    return 0


def cmd_submit(args, extra_layers=(), extra_overrides=(), command="submit") -> int:
    from launchers import backends
    from launchers import spec as specs

    resolved = _resolve(args, extra_layers, extra_overrides)
    spec = specs.build(resolved, strict=True)
    _check_plugin(spec, resolved.origins)
    backend = backends.get(spec.job.backend)
    files = backend.files(spec)  # render before anything is written
    _check_partition(spec, resolved.origins)
    for w in spec.warnings:
        _warn(w)
    spec = _write_run_dir(spec, backend, files, resolved.default_run)
    record.create(spec.run_dir, backend=backend.name, cluster=spec.cluster.name,
                  policy=_policy(spec.config), kind=spec.config.kind)
    t_ready = time.perf_counter()
    try:
        sub = backend.submit(spec)
    except backends.BackendError as e:
        record.add_event(spec.run_dir, "submit-failed", detail=str(e))
        _err(f"{e}\nthe run directory {spec.run_dir} is written; fix the problem, then "
             f"`python -m launchers resume {spec.run_dir}`")
        return 1
    if sub.job_id is None:  # local backend: it ran in the foreground
        record.add_job(spec.run_dir, None, command)
        return _run_local_attempt(spec.run_dir, sub, command)
    total = time.perf_counter() - _T0[0]
    # seconds since `python -m launchers` started (imports included, interpreter start-up not)
    record.add_job(spec.run_dir, sub.job_id, command, timings=dict(
        launcher_s=round(total - sub.scheduler_s, 4), scheduler_s=round(sub.scheduler_s, 4),
        before_submit_s=round(t_ready - _T0[0], 4)))
    _out(f"submitted job {sub.job_id}: {spec.run_dir}")
    _out(f"  status: make status RUN={spec.run_dir}   logs: make logs RUN={spec.run_dir}")
    if spec.config.kind == "sweep":
        from launchers import sweep

        _out(f"  results: {spec.config.sweep.out}/<gpu>/{sweep.model_name(spec)}.md, copied to "
             f"{spec.run_dir / sweep.RESULTS}")
    return 0


def cmd_recipe(args) -> int:
    """Resolve as submit would, and write every key with the layer that set it (recipe.py)."""
    import shlex

    from launchers import recipe
    from launchers import spec as specs

    resolved = _resolve(args)
    spec = specs.build(resolved, strict=False)  # host problems are warnings, as for render
    _check_plugin(spec, resolved.origins, strict=False)
    words = [w for flag in ("model", "cluster", "nodes", "backend")
             if getattr(args, flag) is not None for w in (f"--{flag}", str(getattr(args, flag)))]
    words += [w for f in args.config or [] for w in ("--config", f)] + list(args.overrides)
    command = shlex.join(["python", "-m", "launchers", "recipe", *words])
    text = recipe.text(resolved, command)
    for w in [*spec.warnings, *recipe.warnings(resolved)]:
        _warn(w)
    if args.out is None or args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError("command line", "--out", f"{out} exists already",
                          "choose another --out, or pass --force to replace it")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(out)  # whole or absent
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError("command line", "--out", f"cannot write {out} ({e.strerror})",
                          "choose a writable path") from None
    _out(f"wrote {out}: edit it, then `python -m launchers submit --config {out}` "
         f"(make submit CONFIG={out})")
    return 0


# The sweep's options (benchmarks/sweep.py's flags) and the keys they set: (flag, key, help).
SWEEP_OPTIONS = (
    ("--gpus-per-trial", "sweep.gpus_per_trial",
     "ranks (GPUs) per node of each trial; default: the profile's ranks per node"),
    ("--tp", "trainer.parallel.tensor", "tensor-parallel size of the trials"),
    ("--memory-cap-gib", "trainer.train.memory_cap_gib", "cap each trial's GPU memory (GiB)"),
    ("--min", "sweep.min", "smallest micro batch to try (default 1)"),
    ("--max", "sweep.max", "largest micro batch to try (default 512)"),
    ("--warmup-steps", "sweep.warmup_steps", "steps dropped before timing (default 3)"),
    ("--steps", "sweep.steps", "timed steps per trial (default 10)"),
    ("--recompute", "sweep.recompute", "policies to sweep, e.g. none,selective (default all)"),
    ("--gpu-name", "sweep.gpu_name", "results and table name, e.g. h100_80gb (default detected)"),
    ("--cpu-memory-limit-gib", "sweep.cpu_memory_limit_gib",
     "CPU trials: address-space limit of every trial process (GiB)"),
    ("--trial-timeout", "sweep.trial_timeout_s", "seconds before a trial counts as hung"),
    ("--out", "sweep.out", "results folder, relative to the workdir (default benchmarks/results)"),
    ("--tables", "sweep.tables", "benchmark tables for --write-table (default configs/benchmarks)"),
)


def cmd_sweep(args) -> int:
    args.kind = "sweep"
    args.options = [(flag, key, getattr(args, flag[2:].replace("-", "_")))
                    for flag, key, _ in SWEEP_OPTIONS]
    args.options += [("--compile", "trainer.train.compile", args.compile),
                     ("--write-table", "sweep.write_table", args.write_table or None)]
    if args.dry_run:
        return cmd_render(args)
    return cmd_submit(args, command="sweep")


def cmd_debug(args) -> int:
    args.backend = None
    extra = [f"cluster.tasks_per_node={args.nproc}"] if args.nproc else []
    return cmd_submit(args, extra_layers=[CONFIGS / "debug.yaml"], extra_overrides=extra,
                      command="debug")


def _find_run(run: str | None) -> Path:
    from bionemo import rundir

    if run:
        for candidate in (Path(run), REPO_ROOT / "runs" / run):
            if (candidate / rundir.CONFIG).is_file():
                return candidate.resolve()
        raise ConfigError("command line", "RUN", f"{run} is not a run directory (no config.yaml)",
                          "pass the directory `submit` printed, e.g. runs/esm2/<run>")
    runs = sorted((REPO_ROOT / "runs").glob(f"*/*/{rundir.CONFIG}"),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ConfigError("command line", "RUN", "no runs under runs/",
                          "pass RUN=<run directory>")
    return runs[-1].parent


def _saved(run_dir: Path) -> dict:
    from bionemo import rundir
    from launchers.config import load_resolved

    return load_resolved(run_dir / rundir.CONFIG)


def cmd_status(args) -> int:
    from bionemo import rundir
    from launchers import backends, requeue

    run_dir = _find_run(args.run)
    saved = _saved(run_dir)
    data = record.load(run_dir)
    name = data.get("backend") or saved.get("job", {}).get("backend", "?")
    ids = record.job_ids(data)
    _out(f"run       {run_dir}")
    _out(f"backend   {name} (cluster {saved.get('cluster', {}).get('name', '?')})")
    jobs = [f"{j['job_id']} ({j['command']})" for j in data.get("jobs", []) if j.get("job_id")]
    _out(f"jobs      {', '.join(jobs) or '-'}")
    if ids and name in backends.SCHEDULED:
        for job_id, state in backends.get(name).states(run_dir, saved, ids[-1:]).items():
            _out(f"state     job {job_id}: {runs.left_controller(job_id, saved, state)}")
    if saved.get("sweep"):
        _sweep_status(run_dir, saved)
    else:
        latest = rundir.latest_complete_step(run_dir)
        max_steps = saved.get("trainer", {}).get("train", {}).get("max_steps", "?")
        logged = _last_logged_step(run_dir)
        _out(f"progress  latest complete checkpoint: "
             f"{'none' if latest is None else f'step {latest}'}"
             f"; last logged step: {'-' if logged is None else logged} of {max_steps}")
        speed = runs.speed(run_dir, max_steps)
        if speed:
            _out(f"speed     {speed}")
        _out(f"finished  {'yes' if rundir.is_finished(run_dir) else 'no'}")
    attempts = data.get("attempts", [])
    if attempts:
        a = attempts[-1]
        _out(f"last      {a.get('time')} job {a.get('job_id')} restart {a.get('restart')}: "
             f"exit {requeue.explain_exit(a.get('exit_code'))}, {a.get('outcome')} -> "
             f"{a.get('decision')}")
        _out(f"reason    {a.get('reason')}")
        _out(f"attempts  {len(attempts)} ({sum(a.get('decision') == 'requeue' for a in attempts)}"
             " requeued by the launcher)")
    _unrecorded_decision(run_dir, attempts[-1] if attempts else {})
    for e in data.get("events", [])[-3:]:
        _out(f"event     {e.get('time')} {e.get('event')} {e.get('detail', '')}".rstrip())
    for e in rundir.read_events(run_dir)[-STATUS_EVENTS:]:
        _out(f"event     {_trainer_event(e)}")
    _disk(run_dir)
    return 0


STATUS_EVENTS = 5  # the newest records of events.jsonl that `status` shows
_EVENT_KEYS = ("file", "reason", "rank", "waited_s", "suspect_rank", "suspect_host", "filesystem",
               "detail", "decision", "unrecorded")


def _trainer_event(e: dict) -> str:
    """One record of events.jsonl on one line: time, event, step, host, then what it says."""
    what = "; ".join(f"{k} {e[k]}" for k in _EVENT_KEYS if e.get(k) not in (None, ""))
    line = (f"{e.get('time')} {e.get('event')} step {e.get('step', '-')} on {e.get('host')}"
            + (f": {what}" if what else ""))
    return line if len(line) <= 240 else line[:237] + "..."


def _unrecorded_decision(run_dir: Path, last: dict) -> None:
    """The batch log's last decision when submission.json does not hold it (the requeue step
    could not write it, e.g. on a full disk): the log line is printed before anything is recorded."""
    from bionemo import rundir
    from launchers import requeue

    logs = sorted([*(run_dir / rundir.LOGS).glob("*.out"), *(run_dir / "submitit").glob("*.out")],
                  key=lambda p: p.stat().st_mtime)
    for log in reversed(logs[-3:]):
        try:
            with open(log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 65536))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        found = [i for i, line in enumerate(lines) if line.startswith(requeue.DECISION)]
        if not found:
            continue
        decision, _, reason = lines[found[-1]][len(requeue.DECISION):].strip().partition(" -- ")
        if last.get("decision") == decision and str(last.get("reason", "")).startswith(reason):
            return  # recorded (an amended reason only grows)
        _out(f"decision  {decision} -- {reason}")
        why = next((line for line in lines[found[-1]:] if "could not record" in line),
                   "it is not in submission.json")
        _out(f"          (from {log}: {why.removeprefix('[launcher] ')})")
        return


def _disk(run_dir: Path) -> None:
    """Say so when the run directory's filesystem is (nearly) full: nothing may have been
    recorded, and a resume would fail at its first save."""
    try:
        st = os.statvfs(run_dir)
    except OSError:
        return
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if size and free < 0.02 * size:
        _out(f"disk      {free / 2**20:.1f} MiB free of {size / 2**20:.1f} MiB on the run "
             "directory's filesystem: nearly full; free space before `resume`")


def _sweep_status(run_dir: Path, saved: dict) -> None:
    """A sweep's progress: the trials started so far, then its result per recompute policy."""
    import json

    from launchers import sweep

    sw = saved["sweep"]
    trials = sorted((run_dir / sweep.TRIALS).glob("*/*/*-mbs*"))
    _out(f"sweep     micro batch {sw.get('min')}..{sw.get('max')}, recompute "
         f"{','.join(sw.get('recompute', []))}; trials started: {len(trials)}"
         + (f" (latest {trials[-1].name})" if trials else ""))
    model = Path(saved.get("job", {}).get("model", "?")).stem
    result = run_dir / sweep.RESULTS / f"{model}.json"
    if not result.is_file():
        _out(f"results   none yet ({result})")
        return
    data = json.loads(result.read_text())
    for policy, found in data.get("policies", {}).items():
        _out(f"result    {policy}: largest micro batch {found.get('max_micro_batch_size')}, "
             f"fastest {found.get('micro_batch_size')} ({found.get('tokens_per_s_per_gpu') or 0:,.0f}"
             f" tokens/s/GPU)")
    _out(f"results   {result.with_suffix('.md')} (and {sw.get('out')}/{data.get('gpu')}/)")


def _last_logged_step(run_dir: Path):
    import json

    from bionemo import rundir

    path = run_dir / rundir.METRICS
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line).get("step")
        except ValueError:
            continue
    return None


def cmd_logs(args) -> int:
    from bionemo import rundir
    from launchers import backends

    run_dir = _find_run(args.run)
    data = record.load(run_dir)
    name = data.get("backend") or _saved(run_dir).get("job", {}).get("backend")
    # a backend that keeps logs of its own (submitit, NeMo-Run) names its newest ones
    own = getattr(backends.get(name), "log_files", None) if name in backends.NAMES else None
    logs = sorted((run_dir / rundir.LOGS).glob("*"), key=lambda p: p.stat().st_mtime)
    newest = own(run_dir, _saved(run_dir), record.job_ids(data)) if own else None
    if newest is None:
        newest = [p for p in (_newest(logs, "slurm-"), _newest(logs, "train-")) if p]
    logs = list(dict.fromkeys(logs + newest))
    if not logs:
        _out(f"no logs yet in {run_dir / rundir.LOGS}")
        return 0
    if args.follow:
        os.execvp("tail", ["tail", "-n", str(args.lines), "-F", *map(str, newest)])
    _out("logs: " + ", ".join(p.name for p in logs))
    for p in newest:
        _out(f"==> {p} <==")
        lines = p.read_text(errors="replace").splitlines()
        _out("\n".join(lines[-args.lines:]))
    return 0


def _newest(paths: list[Path], prefix: str) -> Path | None:
    found = [p for p in paths if p.name.startswith(prefix)]
    return found[-1] if found else None


def cmd_cancel(args) -> int:
    from launchers import backends

    run_dir = _find_run(args.run)
    saved = _saved(run_dir)
    data = record.load(run_dir)
    name = data.get("backend") or saved.get("job", {}).get("backend")
    ids = record.job_ids(data)
    if name not in backends.SCHEDULED or not ids:
        _out(f"nothing to cancel: {run_dir} has no scheduler jobs")
        return 0
    cancelled = backends.get(name).cancel(run_dir, saved, ids)
    record.add_event(run_dir, "cancel", detail="jobs " + ", ".join(cancelled))
    _out(f"cancelled job(s) {', '.join(cancelled)} of {run_dir}")
    return 0


_LIVE = runs.LIVE  # scheduler states of a job that has not ended


def cmd_resume(args) -> int:
    from launchers import backends, config
    from launchers import spec as specs

    run_dir = _find_run(args.run)
    saved = _saved(run_dir)
    resolved = config.resolve(base=saved, overrides=args.overrides,
                              kind="sweep" if saved.get("sweep") else "train")
    for key in ("experiment", "run"):
        if getattr(resolved.config.job, key) != saved.get("job", {}).get(key):
            raise ConfigError("command line", f"job.{key}", "cannot change on resume",
                              "submit a new run instead")
    spec = specs.build(resolved, strict=True, existing=True)
    _check_plugin(spec, resolved.origins)
    if spec.run_dir.resolve() != run_dir.resolve():
        raise ConfigError("command line", "cluster.runs_root", "cannot change on resume",
                          f"the run lives in {run_dir}")
    backend = backends.get(spec.job.backend)
    data = record.load(run_dir)
    ids = record.job_ids(data)
    if backend.name in backends.SCHEDULED and ids:
        state = backend.states(run_dir, saved, ids[-1:]).get(ids[-1], "")
        if state.split(" ")[0].split(",")[0] in _LIVE:
            raise ConfigError("command line", "RUN", f"job {ids[-1]} of this run is {state}",
                              f"wait for it or `python -m launchers cancel {run_dir}` first")
    files = backend.files(spec)
    _check_partition(spec, resolved.origins)
    for w in spec.warnings:
        _warn(w)
    _write_files(spec, files)
    if not data.get("policy"):
        record.create(run_dir, backend=backend.name, cluster=spec.cluster.name,
                      policy=_policy(spec.config))
    else:
        record.update(run_dir, lambda d: d.update(policy=_policy(spec.config),
                                                  backend=backend.name))
    if args.overrides:
        record.add_event(run_dir, "resume-overrides", detail=" ".join(args.overrides))
    try:
        sub = backend.resubmit(run_dir, spec.config.model_dump(mode="json"))
    except backends.BackendError as e:
        record.add_event(run_dir, "resume-failed", detail=str(e))
        _err(str(e))
        return 1
    record.add_job(run_dir, sub.job_id, "resume")
    if sub.job_id is None:
        return _run_local_attempt(run_dir, sub, "resume")
    _out(f"resubmitted {run_dir} as job {sub.job_id}; it continues from its latest checkpoint")
    return 0


def cmd_list(args) -> int:
    """Every run under the runs root (a path, or --cluster's cluster.runs_root): launchers/runs.py."""
    root = Path(args.root) if args.root else runs.runs_root(args.cluster or "local")
    if args.root and not root.is_dir():
        raise ConfigError("command line", "ROOT", f"{root} is not a directory",
                          "pass a runs root (e.g. runs) or --cluster NAME")
    found = runs.rows(root) if root.is_dir() else []
    _out(runs.table(found) if found else f"no runs under {root}")
    return 0


def cmd_plot(args) -> int:
    from launchers import plot

    run_dir = _find_run(args.run)
    try:
        paths = plot.plot(run_dir)
    except plot.PlotError as e:
        _err(str(e))
        return 1
    for path in paths:
        _out(str(path))
    return 0


def cmd_cluster(args) -> int:
    from launchers import cluster

    return cluster.main([args.action])


# ------------------------------------------------------------------------------------ parser


def _job_options(p: argparse.ArgumentParser, backend: bool = True) -> None:
    p.add_argument("--model", help="model preset: configs/models/<MODEL>.yaml (or a path)")
    p.add_argument("--cluster", help="cluster profile: configs/clusters/<CLUSTER>.yaml (or a path)"
                   "; default local")
    p.add_argument("--nodes", type=int, help="number of nodes (job.nodes)")
    if backend:
        p.add_argument("--backend",
                       help="sbatch (default), submitit, nemo_run or local (job.backend)")
    p.add_argument("--config", action="append", metavar="FILE",
                   help="a config file with job/cluster/trainer sections (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. trainer.train.max_steps=100 "
                        "job.time_limit=01:00:00")


def _sweep_options(s: argparse.ArgumentParser) -> None:
    _job_options(s)
    for flag, _, text in SWEEP_OPTIONS:
        s.add_argument(flag, help=text)
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="trainer.train.compile in the trials (default: the config's)")
    s.add_argument("--write-table", action="store_true",
                   help="update the model's row in <tables>/<gpu>.yaml")
    s.add_argument("--set", metavar="KEY=VALUE", nargs="+", help="trainer overrides as for "
                   "benchmarks.sweep (same as trainer.KEY=VALUE)")
    s.add_argument("--dry-run", action="store_true",
                   help="print the batch script and the resolved config; submit nothing")


def _debug_options(s: argparse.ArgumentParser) -> None:
    _job_options(s, backend=False)
    s.add_argument("--nproc", type=int, help="processes (one per rank, started here); default 1")
    s.set_defaults(model=None)


def _recipe_options(s: argparse.ArgumentParser) -> None:
    _job_options(s)
    s.add_argument("--out", metavar="FILE", help="the recipe file to write (default: stdout)")
    s.add_argument("--force", action="store_true", help="replace --out when it exists")


def _list_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("root", nargs="?", metavar="ROOT",
                   help="runs root (default: --cluster's cluster.runs_root)")
    s.add_argument("--cluster", help="cluster profile whose runs_root to list; default local")


def _run_options(name: str):
    def add(s: argparse.ArgumentParser) -> None:
        s.add_argument("run", nargs="?", metavar="RUN",
                       help="run directory (default: the newest under runs/)")
        if name == "logs":
            s.add_argument("-n", "--lines", type=int, default=40)
            s.add_argument("-f", "--follow", action="store_true")
        if name == "resume":
            s.add_argument("overrides", nargs="*", metavar="key=value",
                           help="changes to the saved config (e.g. trainer.train.max_steps=2000)")
    return add


# name: (function, help, options)
COMMANDS = {
    "submit": (cmd_submit, "validate, write the run directory and submit", _job_options),
    "render": (cmd_render, "dry run: print the script and the resolved config", _job_options),
    "sweep": (cmd_sweep, "submit a micro-batch sweep: one allocation, every trial an srun step "
              "of it (docs/sweep.md)", _sweep_options),
    "debug": (cmd_debug, "run ~50 steps here, in the foreground (local backend)", _debug_options),
    "recipe": (cmd_recipe, "write the resolved config as an editable, commented file; "
               "`submit --config FILE` runs it", _recipe_options),
    "status": (cmd_status, "what the run is doing, and why it stopped", _run_options("status")),
    "logs": (cmd_logs, "the run's newest logs", _run_options("logs")),
    "cancel": (cmd_cancel, "cancel the run's jobs", _run_options("cancel")),
    "resume": (cmd_resume, "submit an existing run again", _run_options("resume")),
    "list": (cmd_list, "every run under a runs root, one table", _list_options),
    "plot": (cmd_plot, "loss and throughput plots of a run (<run>/plots/)", _run_options("plot")),
    "cluster": (cmd_cluster, "the bundled local SLURM cluster",
                lambda s: s.add_argument("action", choices=["up", "down", "status"])),
}


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; `only`: build just that command's options (each costs start-up time)."""
    p = argparse.ArgumentParser(
        prog="python -m launchers",
        description="Render, submit and manage training runs (docs/launcher.md).",
        epilog="Resolution order: model preset < benchmark table (cluster GPU type) < cluster "
               "profile < --config files < command line.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, text, options) in COMMANDS.items():
        if only in COMMANDS and name != only:
            continue
        s = sub.add_parser(name, help=text)
        options(s)
        s.set_defaults(func=func)
    return p


_VALUE_OPTIONS = {"--model", "--cluster", "--nodes", "--backend", "--config", "--nproc", "-n",
                  "--lines", *(flag for flag, _, _ in SWEEP_OPTIONS)}


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """key=value words may come anywhere (argparse alone would refuse them after an option).
    For `sweep`, the words after --set are trainer overrides (benchmarks.sweep's spelling)."""
    rest, overrides = [], []
    in_set = False
    for i, word in enumerate(argv):
        previous = argv[i - 1] if i else ""
        if word == "--set" and argv[:1] == ["sweep"]:
            in_set = True
            continue
        if word.startswith("-"):
            in_set = False
        if "=" in word and not word.startswith("-") and previous not in _VALUE_OPTIONS:
            if in_set and word.split(".")[0] not in ("job", "cluster", "sweep", "trainer"):
                word = "trainer." + word
            overrides.append(word)
        else:
            rest.append(word)
    return rest, overrides


def _refuse_undecodable(words: list[str]) -> None:
    """Python hands over argument bytes that are not UTF-8 as surrogates, which no file can
    hold: refuse them up front, naming the key or option they were given for."""
    from launchers.config import ALIASES, check_utf8

    for i, word in enumerate(words):
        previous = words[i - 1] if i else ""
        key, value = "(argument)", word
        if "=" in word and (word.startswith("--") or previous not in _VALUE_OPTIONS):
            key, value = word.split("=", 1)  # key=value, or --option=value
            key = ALIASES.get(key, key)
        elif previous.startswith("-"):
            key = previous
        check_utf8(value, "command line", key)


def main(argv: list[str] | None = None, t0: float | None = None) -> int:
    if t0 is not None:
        _T0[0] = t0
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        _refuse_undecodable(words)
    except ConfigError as e:
        _err(str(e))
        return 2
    rest, overrides = _split_overrides(words)
    p = parser(only=rest[0] if rest else None)
    args = p.parse_args(rest)
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + overrides
    elif overrides:
        p.error(f"{args.command} takes no key=value overrides: {' '.join(overrides)}")
    if args.command == "debug" and not args.model:
        args.model = "esm2_8m"
    from launchers.backends.base import BackendError

    try:
        return args.func(args)
    except ConfigError as e:
        _err(str(e))
        return 2
    except BackendError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        return 130
