"""Restart cost with and without the compile cache, and the training time blocked per checkpoint
save, synchronous vs asynchronous (issue 15). One GPU, one process per start, no scheduler:

    python3 benchmarks/restart_cost.py --out OUT [--blocking-model esm2_3b] [--budget 500] [--plan]

Every start runs `python -m bionemo.train RUN` through benchmarks/slurm_gpu/timed_train.py (its
`[timing]` stamps), with train.compile on and one metrics record per step. Phases, in this order:
  1. `async` (--model): empty compile cache; the periodic saves at --every and 2 x --every
     asynchronous, the last one (--steps) synchronous. One run gives the first asynchronous save
     (pinned host buffers allocated), a steady-state one (the buffers reused) and a synchronous
     one. --sleep makes the steps between saves outlast a background write (real runs save
     minutes apart): the trainer's save first waits for a write still in flight, and a blocking
     time that includes such a wait says so (`includes_wait_for_step`, with the part after the
     wait, `blocking_after_wait_s`, dated by the earlier checkpoint's COMPLETE marker).
  2. `sync` (only with --sync-run): the same run with every save synchronous; it uses the first
     run's cache, so its start is a first start with a warm cache.
  3. `restart_warm`: the first run resumed from its last checkpoint with its own (warm) cache,
     killed once the first step is done.
  4. `restart_cold`: the same with an empty cache folder (what a restart cost before the cache).
  5. `<m>_sync`, `<m>_async` for --blocking-model m: one periodic save each (--blocking-every),
     synchronous then asynchronous, SIGKILLed --blocking-after steps after that save (the
     asynchronous write is then still going). A 3B checkpoint is ~34 GB and the GPU machine has
     64 GiB of disk, so every earlier run's checkpoints are deleted before each of these starts
     and their own right after it: the disk never holds two.
A phase starts only if its estimate fits in what is left of --budget ("skipped: budget"); one that
runs past the deadline is killed ("timed out"). summary.json is rewritten after every phase, so a
killed command still leaves results; logs.tar.gz (each start's log, config and metrics; never
checkpoints or caches) at the end. The estimates are one H200's (the results file in
benchmarks/results/h200_141gb/restart_and_async_save.md); --estimate-scale adapts them (tests).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bionemo import rundir  # noqa: E402 -- torch-free
from bionemo.config import ModelConfig  # noqa: E402 -- torch-free
from bionemo.train import COMPILE_CACHE, use_compile_cache  # noqa: E402 -- torch-free

TIMED = REPO / "benchmarks" / "slurm_gpu" / "timed_train.py"
CACHE_LINE = re.compile(
    r"compile cache (\S+): fx graph hits (\d+) misses (\d+), "
    r"aot autograd hits (\d+) misses (\d+)"
)
RESERVE_S = 5  # kept from the budget for the summary and logs.tar.gz after the last phase

# Planning figures for one H200 (the last run's results file): first start of the 650M ~36 s to
# its first step, restarts ~29 s warm / ~44 s cold, saves written at ~0.4 GB/s and checksummed at
# commit. A checkpoint holds fp32 weights and two AdamW moments: 12 bytes per parameter.
FIRST_START_S = 30  # imports, CUDA context, data start-up; plus START_S_PER_GB for build + compile
START_S_PER_GB = 1.0
WRITE_GB_PER_S = 0.4
STAGE_GB_PER_S = 4.0  # pinning and copying to host memory (the first asynchronous save)
RESTART_S = {"restart_warm": 35, "restart_cold": 50}


def say(msg: str) -> None:
    print(f"[restart_cost {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def preset(model: str, args) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "models" / f"{model}.yaml").read_text())
    cfg["trainer"]["model"]["seq_length"] = args.seq_length
    if args.num_layers:
        cfg["trainer"]["model"]["num_layers"] = args.num_layers
    return cfg


def checkpoint_gb(model: str, args) -> float:
    return 12 * ModelConfig(**preset(model, args)["trainer"]["model"]).num_parameters / 1e9


def make_run(run: Path, model: str, args, *, mbs, max_steps, every, keep, async_save) -> None:
    cfg = preset(model, args)
    t = cfg["trainer"]
    data = args.data.resolve()
    t["data"] = {
        "train_clusters": str(data / "train_clusters.parquet"),
        "database": str(data / "proteins.sqlite"),
        "pad_to": "max_length",  # one shape: one compile
    }
    t["optim"]["warmup_steps"] = 10
    t["train"] = {
        "max_steps": max_steps,
        "micro_batch_size": mbs,
        "compile": True,
        "log_every": 1,  # a record per step: step times before, during and after a write
        "device": args.device,
    }
    if args.device == "cpu":  # a check of this script on a machine without a GPU
        t["train"]["precision"] = "fp32"
    t["checkpoint"] = {
        "every_steps": every,
        "keep_last": keep,
        "async_save": async_save,
        "export_final": False,
    }
    run.mkdir(parents=True)
    (run / rundir.CONFIG).write_text(yaml.safe_dump(cfg))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return out


def start(
    run: Path,
    name: str,
    deadline: float,
    cache: Path | None = None,
    sleep: float = 0.0,
    stop_when=None,
) -> dict:
    """One process start of the trainer on `run`; its log is run/<name>.log. stop_when(log text)
    returns why to SIGKILL the process now (or None); past `deadline` it is killed too."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BIONEMO_STEP_SLEEP": str(sleep)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # a folder the user chose: kept as it is
    use_compile_cache(run, env)  # as bionemo.train.main (timed_train.py does not set it)
    log_file = run / f"{name}.log"
    t0 = time.time()
    stopped = None
    timed_out = False
    with open(log_file, "w") as log:
        log.write(f"[timing] {t0:.3f} process start\n")
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, str(TIMED), "-m", "bionemo.train", str(run)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                timed_out = True
                break
            if stop_when is not None:
                stopped = stop_when(log_file.read_text(errors="replace"))
                if stopped:
                    proc.send_signal(signal.SIGKILL)  # nothing more to time
                    break
            time.sleep(0.2)
        rc = proc.wait()
    wall = time.time() - t0
    text = log_file.read_text(errors="replace")
    stamps = [(float(t), p) for t, p in re.findall(r"^\[timing\] (\d+\.\d+) (.+)$", text, re.M)]
    phases, prev = [], t0
    for t, phase in stamps:
        phases.append({"phase": phase, "at_s": round(t - t0, 2), "took_s": round(t - prev, 2)})
        prev = t
    first = next((t for t, p in stamps if p == "first step done"), None)
    hit = CACHE_LINE.search(text)
    out = {
        "name": name,
        "rc": rc,
        "killed": stopped,
        "timed_out": timed_out,
        "wall_s": round(wall, 1),
        "cache_dir": env["TORCHINDUCTOR_CACHE_DIR"],
        "start_to_first_step_s": round(first - t0, 2) if first else None,
        "phases": phases,
    }
    if hit:
        out["compile_cache"] = dict(
            zip(["fx_hits", "fx_misses", "aot_hits", "aot_misses"], map(int, hit.groups()[1:]))
        )
    tail = text.strip().splitlines()[-1:]
    say(
        f"{run.name}/{name}: rc={rc} wall {wall:.1f}s first step at {out['start_to_first_step_s']}s "
        f"cache {out.get('compile_cache')} killed={stopped} timed_out={timed_out} "
        f"(log tail: {tail})"
    )
    return out


def after_first_step(text: str) -> str | None:
    return "after the first step" if CACHE_LINE.search(text) else None


def steps_after_save(metrics: Path, k: int):
    """stop_when for the blocking runs: the checkpoint record is there and k train steps after it."""

    def check(_text: str) -> str | None:
        recs = read_metrics(metrics)
        saved = [r["step"] for r in recs if r["kind"] == "checkpoint"]
        if saved and sum(r["kind"] == "train" and r["step"] > saved[0] for r in recs) >= k:
            return f"{k} steps after the save"
        return None

    return check


def commit_time(run: Path, step: int) -> float | None:
    """When step's checkpoint was committed: its COMPLETE marker, written at the commit (after
    the files' checksums; only fsyncs of already-synced files and the rename come after). This
    also dates a background write committed inside the next save, which logs no line."""
    marker = rundir.step_dir(run, step) / rundir.COMPLETE
    return marker.stat().st_mtime if marker.is_file() else None


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def analyse(run: Path, metrics: Path) -> dict:
    """Saves and step times of one process start, read before its checkpoints are deleted. A
    step's time runs from the previous record (train or checkpoint) to its own, so a save's
    blocking is not counted in the next step; each step is labelled by what the disk was doing."""
    recs = read_metrics(metrics)
    saves = []
    for r in (r for r in recs if r["kind"] == "checkpoint"):
        begin, end = r["time"] - r["save_blocking_s"], r["time"]
        row = {
            "step": r["step"],
            "async": r["async"],
            "blocking_s": round(r["save_blocking_s"], 3),
            "_end": end,
            "_commit": commit_time(run, r["step"]),
        }
        # Checkpointer.save() first waits for a background write still in flight and commits it:
        # that wait is in blocking_s; what this save itself blocked starts at that commit.
        earlier = saves[-1]["_commit"] if saves and saves[-1]["async"] else None
        if earlier is not None and earlier > begin:
            row["includes_wait_for_step"] = saves[-1]["step"]
            row["blocking_after_wait_s"] = round(end - earlier, 3)
        if r["async"]:
            row["committed"] = row["_commit"] is not None
            if row["committed"]:
                row["save_to_commit_s"] = round(row["_commit"] - begin, 2)
        saves.append(row)
    steps, prev = [], None
    for r in recs:
        if r["kind"] == "train":
            row = {"step": r["step"], "loss": round(r["loss"], 4)}
            row["step_s"] = round(r["time"] - prev, 3) if prev is not None else None
            row["during"] = _label(prev, r["time"], saves)
            steps.append(row)
        if r["kind"] in ("train", "checkpoint"):
            prev = r["time"]
    timed = [s for s in steps if s["step_s"] is not None]  # not the first (compile) step
    for s in saves:
        s.pop("_end")
        s.pop("_commit")
    return {
        "saves": saves,
        "step_s_median": {
            "no_write": _median([s["step_s"] for s in timed if s["during"] == "-"]),
            "while_writing": _median([s["step_s"] for s in timed if s["during"] == "writing"]),
        },
        "commit_step_s": [
            {"step": s["step"], "step_s": s["step_s"]} for s in timed if s["during"] == "commit"
        ],
        "steps": steps,
    }


def _label(begin: float | None, end: float, saves: list[dict]) -> str:
    """'writing' if an asynchronous write was in flight for the whole step, 'commit' if it was
    committed during the step (poll() commits in the training thread: checksums and fsyncs)."""
    if begin is None:
        return "first"
    for s in saves:
        if not s["async"] or s["_end"] > begin:
            continue
        commit = s["_commit"]
        if commit is None or commit >= end:
            return "writing"
        if begin <= commit < end:
            return "commit"
    return "-"


def estimates(args) -> dict[str, int]:
    """Seconds per phase on one H200, from the checkpoint sizes (the restarts as measured)."""
    gb = checkpoint_gb(args.model, args)
    first = FIRST_START_S + START_S_PER_GB * gb
    staged = gb / STAGE_GB_PER_S + gb / (4 * WRITE_GB_PER_S)  # staging; the commit's checksums
    est = {"async": first + args.steps * (0.15 + args.sleep) + 2 * staged + gb / WRITE_GB_PER_S}
    if args.sync_run:  # a warm cache; three synchronous saves
        est["sync"] = est["async"] - 2 * staged - START_S_PER_GB * gb / 2 + 2 * gb / WRITE_GB_PER_S
    est.update(RESTART_S)
    if args.blocking_model:
        m, gb = args.blocking_model, checkpoint_gb(args.blocking_model, args)
        est[f"{m}_sync"] = FIRST_START_S + START_S_PER_GB * gb + gb / WRITE_GB_PER_S + 15
        est[f"{m}_async"] = FIRST_START_S + START_S_PER_GB * gb / 2 + gb / STAGE_GB_PER_S + 15
    return {k: round(v * args.estimate_scale) for k, v in est.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", type=Path, default=Path("/tmp/restart_cost"))
    p.add_argument("--data", type=Path, default=REPO / "data" / "sample")
    p.add_argument("--model", default="esm2_650m")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--mbs", type=int, default=16)
    p.add_argument(
        "--every",
        type=int,
        default=20,
        help="periodic saves at this step and twice it (asynchronous), the last at --steps",
    )
    p.add_argument("--steps", type=int, default=59, help="between 2 x --every and 3 x --every")
    p.add_argument(
        "--sleep",
        type=float,
        default=0.9,
        help="BIONEMO_STEP_SLEEP of the --model runs: --every - 1 steps should outlast a "
        "background write (650M: ~7.8 GB at ~0.4 GB/s, ~20 s), as saves minutes apart do",
    )
    p.add_argument("--sync-run", action="store_true", help="also the all-synchronous --model run")
    p.add_argument(
        "--no-restarts", action="store_true", help="only the --model run's saves (no restarts)"
    )
    p.add_argument("--blocking-model", help="e.g. esm2_3b: its sync vs async save (off if unset)")
    p.add_argument("--blocking-mbs", type=int, default=8)
    p.add_argument("--blocking-every", type=int, default=5, help="its one periodic save's step")
    p.add_argument(
        "--blocking-after", type=int, default=3, help="steps after that save before the kill"
    )
    p.add_argument("--device", default="cuda", help="cpu: a check of this script")
    p.add_argument("--num-layers", type=int, help="shrink both models (the CPU check)")
    p.add_argument("--budget", type=float, default=500, help="seconds for everything")
    p.add_argument("--estimate-scale", type=float, default=1.0, help="multiplies the estimates")
    p.add_argument("--plan", action="store_true", help="print the estimates and exit")
    args = p.parse_args()
    if not 2 * args.every < args.steps < 3 * args.every:
        p.error("--steps must lie between 2 x --every and 3 x --every (two periodic saves)")
    if args.runs.exists() and any(args.runs.iterdir()) and not args.plan:
        p.error(f"--runs {args.runs} is not empty; remove it or choose another folder")

    est = estimates(args)
    say(
        f"plan (estimated s on one H200 x {args.estimate_scale}): "
        + ", ".join(f"{k} {v}" for k, v in est.items())
        + f"; total ~{sum(est.values())} s of a {args.budget:.0f} s budget"
    )
    if args.plan:
        return 0

    t_begin = time.monotonic()
    deadline = t_begin + args.budget - RESERVE_S
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "estimate_s": est,
        "phases": {},
        "starts": {},
    }
    runs_made: list[Path] = []

    def write() -> None:
        summary["elapsed_s"] = round(time.monotonic() - t_begin, 1)
        summary["highlights"] = highlights(summary)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))

    def fits(name: str) -> bool:
        need, left = est[name], deadline - time.monotonic()
        if left >= need:
            return True
        summary["phases"][name] = f"skipped: budget (needs ~{need:.0f} s, {left:.0f} s left)"
        say(summary["phases"][name] + f" [{name}]")
        write()
        return False

    def record(name: str, result: dict) -> None:
        summary["starts"][name] = result
        if result["timed_out"]:
            status = "timed out"
        elif result["killed"]:
            status = f"done, killed {result['killed']}"
        else:
            status = "done" if result["rc"] == 0 else f"failed (rc {result['rc']})"
        summary["phases"][name] = status
        write()

    def drop_checkpoints() -> None:
        for run in runs_made:
            shutil.rmtree(run / rundir.CHECKPOINTS, ignore_errors=True)

    # Versions and inductor's cache defaults, in a process of their own beside the first run.
    probe = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import json, torch, torch._inductor.config as i, torch._functorch.config as f;"
                "print(json.dumps({'torch': torch.__version__, 'gpu': torch.cuda.is_available() and torch.cuda.get_device_name(0),"
                "'fx_graph_cache': i.fx_graph_cache, 'autograd_cache': f.enable_autograd_cache,"
                "'bundle_triton_into_fx_graph_cache': i.bundle_triton_into_fx_graph_cache}))"
            ),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    # 1-2: the --model runs.
    a, b = args.runs / "async", args.runs / "sync"
    # keep_last 3: every save's COMPLETE marker dates its commit (three 650M checkpoints: 23 GB)
    common = dict(mbs=args.mbs, max_steps=args.steps, every=args.every, keep=3)
    if fits("async"):
        make_run(a, args.model, args, async_save=True, **common)
        runs_made.append(a)
        record("async", start(a, "first", deadline, sleep=args.sleep))
        summary["starts"]["async"].update(analyse(a, a / rundir.METRICS))
        # the restarts rewind metrics.jsonl to their checkpoint: keep this start's records
        if (a / rundir.METRICS).is_file():
            shutil.copy(a / rundir.METRICS, a / "first.metrics.jsonl")
    summary["probe"] = probe.communicate()[0].strip()
    write()
    if args.sync_run and fits("sync"):
        make_run(b, args.model, args, async_save=False, **common)
        runs_made.append(b)
        cache = a / COMPILE_CACHE if a.is_dir() else None
        record("sync", start(b, "first", deadline, cache=cache, sleep=args.sleep))
        summary["starts"]["sync"].update(analyse(b, b / rundir.METRICS))
        write()

    # 3-4: the first run, a few steps longer, resumed from its last checkpoint.
    if args.no_restarts or rundir.latest_complete_step(a) is None:
        why = "--no-restarts" if args.no_restarts else "no checkpoint of the async run"
        for name in RESTART_S:
            summary["phases"][name] = f"skipped: {why}"
        write()
    else:
        cfg = yaml.safe_load((a / rundir.CONFIG).read_text())
        cfg["trainer"]["train"]["max_steps"] = args.steps + 10
        (a / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
        (a / rundir.FINISHED).unlink(missing_ok=True)
        if fits("restart_warm"):
            record("restart_warm", start(a, "restart_warm", deadline, stop_when=after_first_step))
        if fits("restart_cold"):
            empty = args.runs / "empty_cache"
            empty.mkdir()
            record(
                "restart_cold",
                start(a, "restart_cold", deadline, cache=empty, stop_when=after_first_step),
            )

    # 5: one save of --blocking-model, synchronous then asynchronous (one checkpoint on disk).
    if args.blocking_model:
        m = args.blocking_model
        need_gb = 1.1 * checkpoint_gb(m, args)
        cache = None
        for mode in ("sync", "async"):
            name = f"{m}_{mode}"
            drop_checkpoints()
            free_gb = shutil.disk_usage(args.runs).free / 1e9
            if free_gb < need_gb:
                summary["phases"][name] = (
                    f"skipped: disk ({free_gb:.0f} GB free, {need_gb:.0f} needed)"
                )
                write()
                continue
            if not fits(name):
                continue
            run = args.runs / name
            make_run(
                run,
                m,
                args,
                mbs=args.blocking_mbs,
                max_steps=10**6,  # never reached: killed after its one save (no last save)
                every=args.blocking_every,
                keep=1,
                async_save=mode == "async",
            )
            runs_made.append(run)
            stop = steps_after_save(run / rundir.METRICS, args.blocking_after)
            result = start(run, "first", deadline, cache=cache, stop_when=stop)
            result.update(analyse(run, run / rundir.METRICS))
            record(name, result)
            cache = run / COMPILE_CACHE  # the async run starts with the sync run's compiled graphs
        drop_checkpoints()

    summary["total_s"] = round(time.monotonic() - t_begin, 1)
    write()
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        for run in runs_made:
            files = sorted(run.glob("*.log")) + sorted(run.glob("*metrics.jsonl"))
            files += [run / f for f in (rundir.CONFIG, rundir.EVENTS) if (run / f).is_file()]
            for f in files:
                tar.add(f, arcname=f"{run.name}/{f.name}")
    say(f"done in {summary['total_s']} s: {json.dumps(summary['highlights'])}")
    return 0


def highlights(summary: dict) -> dict:
    """The figures the results file quotes, from summary['starts']."""
    s = summary["starts"]
    out: dict = {}
    for name in ("async", "sync", "restart_warm", "restart_cold"):
        if name in s:
            out[f"{name}_start_to_first_step_s"] = s[name]["start_to_first_step_s"]
    for name, run in s.items():
        if "saves" not in run:
            continue
        out[name] = {
            "saves": run["saves"],
            "step_s_median": run["step_s_median"],
            "commit_step_s": run["commit_step_s"],
            "wall_s": run["wall_s"],
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
