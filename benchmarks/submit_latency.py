"""Time `python -m launchers submit` end to end against the bundled SLURM cluster.

    .venv/bin/python benchmarks/submit_latency.py [--runs 15] [--model esm2_8m] [--nodes 2]
    make bench-submit

Each repetition is a fresh process, exactly what `make submit` runs (interpreter start, config
resolution and validation, rendering, writing the run directory, sbatch). Jobs are submitted held
(job.hold=true) into a throw-away runs_root and cancelled at the end, so nothing trains. The
launcher's share is the process's wall time minus the time sbatch waited for slurmctld's reply,
which the launcher records in submission.json (jobs[].timings.scheduler_s). Target: median
<= 0.3 s. The CPU time (user+sys) is recorded too: on a shared machine the wall time grows with
other load, the CPU time hardly. Results go to benchmarks/results/submit_latency.json.

Whether the launcher's own modules load from cached bytecode (__pycache__, Python's default) or
are compiled at every start (PYTHONDONTWRITEBYTECODE set and no cache: about 25 ms more) is
recorded as `bytecode`; the benchmark leaves the environment as it finds it.
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
TARGET_S = 0.3


# The project's modules on submit's path (site-packages are byte-compiled when installed).
OWN_MODULES = ("launchers/cli.py", "launchers/config.py", "launchers/backends/sbatch.py",
               "launchers/slurm.py", "launchers/sweep.py", "bionemo/config.py")


def bytecode_state() -> str:
    """'cached' when every own module has a current .pyc, 'compiled at each start' when none."""
    import importlib.util

    current = 0
    for rel in OWN_MODULES:
        src = REPO / rel
        pyc = Path(importlib.util.cache_from_source(str(src)))
        try:
            header = pyc.read_bytes()[:16]
        except OSError:
            continue
        stat = src.stat()
        flags = int.from_bytes(header[4:8], "little")
        if flags == 0 and int.from_bytes(header[8:12], "little") == int(stat.st_mtime) \
                and int.from_bytes(header[12:16], "little") == stat.st_size & 0xFFFFFFFF:
            current += 1
    if current == len(OWN_MODULES):
        return "cached"
    return "compiled at each start" if current == 0 else "partly cached"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--model", default="esm2_8m")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--out", type=Path,
                   default=REPO / "benchmarks" / "results" / "submit_latency.json")
    args = p.parse_args()

    from launchers import cluster

    cluster.up()  # not timed: a cold start is a one-off
    load_before = os.getloadavg()
    env = {**os.environ, **cluster.slurm_env()}
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
    rows, job_ids = [], []
    with tempfile.TemporaryDirectory(prefix="submit-bench-") as root:
        for i in range(args.runs + 1):  # the first run warms the page cache and is dropped
            run = f"bench-{i:03d}"
            cmd = [python, "-m", "launchers", "submit", "--model", args.model, "--nodes",
                   str(args.nodes), f"cluster.runs_root={root}", "job.experiment=bench",
                   f"job.run={run}", "job.hold=true"]
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            if out.returncode != 0:
                print(out.stdout, out.stderr, file=sys.stderr)
                return 1
            rec = json.loads((Path(root) / "bench" / run / "submission.json").read_text())
            job = rec["jobs"][-1]
            job_ids.append(job["job_id"])
            t = job.get("timings", {})
            if i:
                rows.append(dict(wall_s=wall, scheduler_s=t.get("scheduler_s", 0.0),
                                 launcher_s=wall - t.get("scheduler_s", 0.0), cpu_s=cpu))
        subprocess.run(["scancel", *job_ids], env=env, capture_output=True)

    launcher = [r["launcher_s"] for r in rows]
    summary = dict(
        what="python -m launchers submit, fresh process each, held jobs on the bundled cluster",
        command="make bench-submit (.venv/bin/python benchmarks/submit_latency.py "
                f"--runs {args.runs} --model {args.model} --nodes {args.nodes})",
        model=args.model, nodes=args.nodes, runs=len(rows),
        median_launcher_s=round(statistics.median(launcher), 4),
        p90_launcher_s=round(sorted(launcher)[int(0.9 * (len(launcher) - 1))], 4),
        min_launcher_s=round(min(launcher), 4),
        median_wall_s=round(statistics.median(r["wall_s"] for r in rows), 4),
        median_scheduler_s=round(statistics.median(r["scheduler_s"] for r in rows), 4),
        # CPU time (user+sys, the launcher and sbatch): what the wall time would be on an idle
        # machine, nearly independent of other load
        median_cpu_s=round(statistics.median(r["cpu_s"] for r in rows), 4),
        target_s=TARGET_S,
        bytecode=bytecode_state(),
        pythondontwritebytecode=os.environ.get("PYTHONDONTWRITEBYTECODE"),
        meets_target=statistics.median(launcher) <= TARGET_S,
        machine=dict(python=platform.python_version(), cpus=os.cpu_count(),
                     platform=platform.platform(),
                     # other work on the machine slows imports down; note how busy it was
                     load_average_before=[round(x, 2) for x in load_before],
                     load_average_after=[round(x, 2) for x in os.getloadavg()]),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        samples=[{k: round(v, 4) for k, v in r.items()} for r in rows],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"submit: median {summary['median_launcher_s']:.3f} s excluding the scheduler's reply "
          f"(p90 {summary['p90_launcher_s']:.3f} s, wall {summary['median_wall_s']:.3f} s, "
          f"sbatch {summary['median_scheduler_s']:.3f} s, CPU {summary['median_cpu_s']:.3f} s) "
          f"over {len(rows)} runs, bytecode {summary['bytecode']}; target "
          f"{TARGET_S} s: {'met' if summary['meets_target'] else 'NOT met'} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
