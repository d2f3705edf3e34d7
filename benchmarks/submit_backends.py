"""Time `python -m launchers submit` for the same job through the three SLURM backends.

    .venv/bin/python benchmarks/submit_backends.py [--runs 7] [--model esm2_8m] [--nodes 2]

One run of this script submits the same resolved job (model, nodes, cluster profile, overrides)
through `--backend sbatch`, `--backend submitit` and `--backend nemo_run`, round-robin so that a
change in machine load hits all three alike, each repetition a fresh process, exactly what
`make submit BACKEND=...` runs: interpreter start, the backend's imports, config resolution and
validation, the backend's script generation, writing the run directory, sbatch. Jobs are
submitted held (job.hold=true) into a throw-away runs_root and cancelled at the end, so nothing
trains; the first round warms the page cache and is dropped. Wall and CPU time (user+sys of the
process and its children, sbatch included) are recorded; the figure compared is the median wall
time. Goal: the native path <= 1/5 of NeMo-Run's.
Results: benchmarks/results/submit_backends.json and .md.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BACKENDS = ("sbatch", "submitit", "nemo_run")
GOAL_RATIO = 5.0  # native <= NeMo-Run / 5


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("submitit", "nemo_run", "leptonai", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=7, help="timed submissions per backend")
    p.add_argument("--model", default="esm2_8m")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--out", type=Path,
                   default=REPO / "benchmarks" / "results" / "submit_backends.json")
    args = p.parse_args()

    from launchers import cluster, record

    cluster.up()  # not timed
    env = {**os.environ, **cluster.slurm_env()}
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
    load_before = os.getloadavg()
    samples: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    job_ids: list[str] = []
    with tempfile.TemporaryDirectory(prefix="submit-backends-") as root:
        for i in range(args.runs + 1):
            for backend in BACKENDS:
                run = f"{backend.replace('_', '-')}-{i:03d}"  # no "/nemo_run" in paths
                cmd = [python, "-m", "launchers", "submit", "--backend", backend, "--model",
                       args.model, "--nodes", str(args.nodes), f"cluster.runs_root={root}",
                       "job.experiment=bench", f"job.run={run}", "job.hold=true"]
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if out.returncode != 0:
                    print(out.stdout, out.stderr, file=sys.stderr)
                    subprocess.run(["scancel", *job_ids], env=env, capture_output=True)
                    return 1
                rec = record.load(Path(root) / "bench" / run)
                job = rec["jobs"][-1]
                job_ids.append(job["job_id"])
                if i:  # round 0 warms caches
                    t = job.get("timings", {})
                    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
                    samples[backend].append(dict(
                        wall_s=wall, cpu_s=cpu, launcher_s=t.get("launcher_s"),
                        scheduler_s=t.get("scheduler_s")))
        subprocess.run(["scancel", *job_ids], env=env, capture_output=True)

    def med(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    summary = {b: dict(median_wall_s=med(rows, "wall_s"),
                       min_wall_s=round(min(r["wall_s"] for r in rows), 4),
                       max_wall_s=round(max(r["wall_s"] for r in rows), 4),
                       median_cpu_s=med(rows, "cpu_s"),
                       # seconds since `python -m launchers` started, minus sbatch's wait (the
                       # CLI's own measure, submission.json jobs[].timings)
                       median_launcher_s=med(rows, "launcher_s"))
               for b, rows in samples.items()}
    # what importing each backend's library costs by itself (fresh processes, median of 3)
    imports = {}
    for module in ("submitit", "nemo_run"):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([python, "-c", f"import {module}"], cwd=REPO, check=True)
            times.append(time.perf_counter() - t0)
        imports[module] = round(statistics.median(times), 4)
    native, nemo = summary["sbatch"]["median_wall_s"], summary["nemo_run"]["median_wall_s"]
    result = dict(
        what="python -m launchers submit --backend B, same job, fresh process each, held jobs on "
             "the bundled cluster, round-robin over the backends",
        command=f".venv/bin/python benchmarks/submit_backends.py --runs {args.runs} "
                f"--model {args.model} --nodes {args.nodes}",
        model=args.model, nodes=args.nodes, runs_per_backend=args.runs,
        backends=summary,
        native_over_nemo_run=round(native / nemo, 4),
        native_over_submitit=round(native / summary["submitit"]["median_wall_s"], 4),
        import_only_s=imports,  # `python -c "import X"`, interpreter start included
        goal="native median wall <= 1/5 of NeMo-Run's",
        meets_goal=native * GOAL_RATIO <= nemo,
        versions=_versions(),
        machine=dict(python=platform.python_version(), cpus=os.cpu_count(),
                     platform=platform.platform(),
                     load_average_before=[round(x, 2) for x in load_before],
                     load_average_after=[round(x, 2) for x in os.getloadavg()]),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        samples={b: [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                     for r in rows] for b, rows in samples.items()},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    for b in BACKENDS:
        s = summary[b]
        print(f"{b:9s} median {s['median_wall_s']:.3f} s wall (min {s['min_wall_s']:.3f}, "
              f"max {s['max_wall_s']:.3f}), {s['median_cpu_s']:.3f} s CPU")
    print(f"native / NeMo-Run = {result['native_over_nemo_run']:.3f} "
          f"(goal <= {1 / GOAL_RATIO:.2f}): {'met' if result['meets_goal'] else 'NOT met'} "
          f"-> {args.out}")
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# `submit` latency by backend",
        "",
        f"{r['what']}. Command: `{r['command']}`. {r['date']}, Python {r['machine']['python']}, "
        f"{r['machine']['cpus']} CPUs, load average before {r['machine']['load_average_before']}. "
        f"Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v) + ".",
        "",
        "| backend | median wall (s) | min (s) | max (s) | median CPU (s) | vs native |",
        "|---|---|---|---|---|---|",
    ]
    native = r["backends"]["sbatch"]["median_wall_s"]
    for b, s in r["backends"].items():
        lines.append(f"| {b} | {s['median_wall_s']:.3f} | {s['min_wall_s']:.3f} | "
                     f"{s['max_wall_s']:.3f} | {s['median_cpu_s']:.3f} | "
                     f"{s['median_wall_s'] / native:.1f}x |")
    lines += ["", f"Native / NeMo-Run = {r['native_over_nemo_run']:.3f}; goal <= 0.2: "
              f"{'met' if r['meets_goal'] else 'NOT met'}. `python -c \"import nemo_run\"` alone "
              f"takes {r['import_only_s']['nemo_run']:.3f} s (it imports torch, fiddle, torchx and "
              f"leptonai), `import submitit` {r['import_only_s']['submitit']:.3f} s: NeMo-Run's "
              "time is mostly its import; submitit adds pickling the job and little else.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
