"""Time `python -m launchers submit` of one job through the sbatch and NeMo-Run backends, side by
side, against the bundled SLURM cluster.

    make bench-submit                  # = .venv/bin/python benchmarks/submit_latency.py
    .venv/bin/python benchmarks/submit_latency.py [--runs 10] [--backends sbatch,submitit,nemo_run]

Each repetition is a fresh process, exactly what `make submit BACKEND=...` runs: interpreter
start, imports, config resolution and validation, the backend's script, writing the run
directory, sbatch. The backends take turns (round-robin), so a change in machine load hits them
alike; the first round warms the page cache and is dropped. Jobs are submitted held
(job.hold=true) into a throw-away runs_root and cancelled at the end, so nothing trains and the
shared cluster is left as it was. The figure compared is the median wall time of the process.

Goal: sbatch's median <= 0.5 s, and <= 1/5 of NeMo-Run's for the same job. CPU time (user+sys of
the process and its children) is recorded too: on a shared machine the wall time grows with
other load, the CPU time hardly. Results: benchmarks/results/submit_latency.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launchers import cluster, record  # noqa: E402  (the checkout's, whatever the working directory)
from launchers.paths import project_commit  # noqa: E402

GOAL_S = 0.5  # sbatch's median wall time
GOAL_RATIO = 5.0  # sbatch <= NeMo-Run / 5
RESULTS = REPO / "benchmarks" / "results" / "submit_latency.json"


def submit_once(python: str, backend: str, run: str, root: str, args, env: dict) -> dict:
    cmd = [
        python,
        "-m",
        "launchers",
        "submit",
        "--backend",
        backend,
        "--model",
        args.model,
        "--nodes",
        str(args.nodes),
        f"cluster.runs_root={root}",
        "job.experiment=bench",
        f"job.run={run}",
        "job.hold=true",
    ]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}{out.stderr}")
    job = record.load(Path(root) / "bench" / run)["jobs"][-1]
    timings = job.get("timings", {})
    return dict(
        job_id=job["job_id"],
        wall_s=wall,
        cpu_s=(r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        # since `python -m launchers` started, minus sbatch's wait (submission.json)
        launcher_s=timings.get("launcher_s"),
        scheduler_s=timings.get("scheduler_s"),
    )


def commit() -> str:
    return project_commit() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=10, help="timed submissions per backend")
    p.add_argument(
        "--backends",
        default="sbatch,nemo_run",
        help="comma-separated; sbatch and nemo_run are always included",
    )
    p.add_argument("--model", default="esm2_8m")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    names = list(dict.fromkeys(["sbatch", "nemo_run", *args.backends.split(",")]))

    cluster.up()  # not timed: a cold start is a one-off
    env = {**os.environ, **cluster.slurm_env()}
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
    load_before = os.getloadavg()
    samples: dict[str, list[dict]] = {b: [] for b in names}
    job_ids: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="submit-bench-") as root:
            for i in range(args.runs + 1):
                for backend in names:
                    run = f"{backend.replace('_', '-')}-{i:03d}"  # no "/nemo_run" in paths
                    row = submit_once(python, backend, run, root, args, env)
                    job_ids.append(row.pop("job_id"))
                    if i:  # round 0 warms caches
                        samples[backend].append(row)
    finally:
        subprocess.run(["scancel", *job_ids], env=env, capture_output=True)

    def med(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    summary = {
        b: dict(
            median_wall_s=med(rows, "wall_s"),
            min_wall_s=round(min(r["wall_s"] for r in rows), 4),
            max_wall_s=round(max(r["wall_s"] for r in rows), 4),
            median_cpu_s=med(rows, "cpu_s"),
            median_launcher_s=med(rows, "launcher_s"),
            median_scheduler_s=med(rows, "scheduler_s"),
        )
        for b, rows in samples.items()
    }
    native, nemo = summary["sbatch"]["median_wall_s"], summary["nemo_run"]["median_wall_s"]
    result = dict(
        what="python -m launchers submit --backend B, same job, fresh process each, held jobs "
        "on the bundled cluster, round-robin over the backends",
        command="make bench-submit (.venv/bin/python benchmarks/submit_latency.py "
        f"--runs {args.runs} --backends {','.join(names)} --model {args.model} "
        f"--nodes {args.nodes})",
        commit=commit(),
        model=args.model,
        nodes=args.nodes,
        runs_per_backend=args.runs,
        backends=summary,
        sbatch_over_nemo_run=round(native / nemo, 4),
        goal=f"sbatch median wall <= {GOAL_S} s and <= 1/{GOAL_RATIO:g} of NeMo-Run's",
        meets_goal=native <= GOAL_S and native * GOAL_RATIO <= nemo,
        versions={
            name: _version(name)
            for name in ("pydantic", "jinja2", "pyyaml", "submitit", "nemo_run", "torch")
        },
        # set: no module's bytecode is cached, every start compiles the launcher's own modules
        pythondontwritebytecode=os.environ.get("PYTHONDONTWRITEBYTECODE"),
        machine=dict(
            python=platform.python_version(),
            cpus=os.cpu_count(),
            platform=platform.platform(),
            # other work on the machine slows every process down; note how busy it was
            load_average_before=[round(x, 2) for x in load_before],
            load_average_after=[round(x, 2) for x in os.getloadavg()],
        ),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        samples={
            b: [
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                for r in rows
            ]
            for b, rows in samples.items()
        },
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    for b in names:
        s = summary[b]
        print(
            f"{b:9s} median {s['median_wall_s']:.3f} s wall (min {s['min_wall_s']:.3f}, "
            f"max {s['max_wall_s']:.3f}), {s['median_cpu_s']:.3f} s CPU"
        )
    print(
        f"sbatch / NeMo-Run = {result['sbatch_over_nemo_run']:.3f}; goal: {result['goal']}: "
        f"{'met' if result['meets_goal'] else 'NOT met'} -> {args.out}"
    )
    return 0


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# `submit` latency: sbatch beside NeMo-Run",
        "",
        f"{r['what']}. Command: `{r['command']}`. {r['date']}, commit {r['commit']}; "
        f"Python {m['python']}, {m['cpus']} CPUs ({m['platform']}), load average before "
        f"{m['load_average_before']}, after {m['load_average_after']}; "
        f"PYTHONDONTWRITEBYTECODE={r['pythondontwritebytecode']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v)
        + ".",
        "",
        "| backend | median wall (s) | min (s) | max (s) | median CPU (s) | vs sbatch |",
        "|---|---|---|---|---|---|",
    ]
    native = r["backends"]["sbatch"]["median_wall_s"]
    for b, s in r["backends"].items():
        lines.append(
            f"| {b} | {s['median_wall_s']:.3f} | {s['min_wall_s']:.3f} | "
            f"{s['max_wall_s']:.3f} | {s['median_cpu_s']:.3f} | "
            f"{s['median_wall_s'] / native:.1f}x |"
        )
    lines += [
        "",
        f"sbatch / NeMo-Run = {r['sbatch_over_nemo_run']:.3f}. Goal: {r['goal']}: "
        f"{'met' if r['meets_goal'] else 'NOT met'}. NeMo-Run's time is mostly its import "
        "(it imports torch, fiddle, torchx and leptonai).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
