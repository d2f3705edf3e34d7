"""The GPU chain through the bundled SLURM cluster (issue 15), after prepare.sh (README.md here).

Submits three ESM-2 650M runs of one config through `python -m launchers submit --cluster
local_gpu`: `limited` (a 2-minute limit, the warning 30 s before it, BIONEMO_STEP_SLEEP keeping it
alive until then: it saves, exits 75, requeues, resumes, finishes) and two uninterrupted ones,
`ref1` and `ref2` (their difference is the run-to-run noise of the GPU kernels). With one GPU the
jobs take turns on node1. Requeued jobs are released at once (SLURM would hold them ~120 s).
Writes summary.json (loss comparison, restart timings) and runs.tar.gz (each run's config, logs,
metrics.jsonl, submission.json, events; no checkpoints) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def job(job_id: str) -> dict[str, str]:
    out = sh("scontrol", "show", "job", "-o", job_id).stdout.strip()
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|$)", out))


def submit(args, name: str, common: list[str], extra: list[str]) -> tuple[Path, str]:
    out = sh(
        sys.executable,
        "-m",
        "launchers",
        "submit",
        "--model",
        args.model,
        "--cluster",
        args.cluster,
        "--nodes",
        "1",
        f"cluster.runs_root={args.runs_root}",
        "job.experiment=slurm_gpu",
        f"job.run={name}",
        *common,
        *extra,
    )
    log(
        f"submit {name}: rc={out.returncode} {out.stdout.strip()[-300:]} {out.stderr.strip()[-600:]}"
    )
    if out.returncode:
        raise SystemExit(f"submit {name} failed")
    run_dir = args.runs_root / "slurm_gpu" / name
    jobs = json.loads((run_dir / "submission.json").read_text())["jobs"]
    return run_dir, jobs[-1]["job_id"]


def release(job_id: str, rec: dict[str, str]) -> None:
    """As tests/conftest.py release(): not within the requeue's second (credential revoked)."""
    submitted = time.mktime(time.strptime(rec.get("SubmitTime", ""), "%Y-%m-%dT%H:%M:%S"))
    if time.time() >= submitted + 2:
        out = sh("scontrol", "update", f"jobid={job_id}", "StartTime=now")
        log(
            f"released job {job_id} (Restarts={rec.get('Restarts')}): rc={out.returncode} {out.stderr.strip()}"
        )


def wait_all(jobs: dict[str, str], deadline: float) -> dict[str, dict[str, str]]:
    seen: dict[str, str] = {}
    recs: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline:
        for name, job_id in jobs.items():
            rec = recs[name] = job(job_id)
            state = (
                f"{rec.get('JobState')} restarts={rec.get('Restarts')} reason={rec.get('Reason')}"
            )
            if seen.get(name) != state:
                log(f"{name} (job {job_id}): {state}")
                seen[name] = state
            if rec.get("JobState") == "PENDING" and int(rec.get("Restarts") or 0) > 0:
                release(job_id, rec)
        if all(r.get("JobState") in FINAL for r in recs.values()):
            break
        time.sleep(1.0)
    return recs


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def diff(a: dict[int, float], b: dict[int, float], steps) -> dict:
    d = [abs(a[s] - b[s]) for s in steps if s in a and s in b]
    return {
        "steps": len(d),
        "max_abs": max(d) if d else None,
        "mean_abs": sum(d) / len(d) if d else None,
    }


def timings(log_file: Path) -> list[tuple[float, str]]:
    if not log_file.exists():
        return []
    found = re.findall(r"^\[timing\] (\d+\.\d+) (.+)$", log_file.read_text(errors="replace"), re.M)
    return [(float(t), phase) for t, phase in found]


def breakdown(run_dir: Path, restart: int) -> dict:
    """Phases of one start of a run: seconds since the previous stamp, from its train log."""
    logs = sorted((run_dir / "logs").glob(f"train-*-r{restart}.log"))
    stamps = timings(logs[-1]) if logs else []
    if not stamps:
        return {}
    t0, prev, phases = stamps[0][0], stamps[0][0], []
    for t, phase in stamps:
        phases.append({"phase": phase, "at_s": round(t - t0, 2), "took_s": round(t - prev, 2)})
        prev = t
    return {"log": logs[-1].name, "phases": phases, "start_to_first_step_s": round(prev - t0, 2)}


def _no_checkpoints(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "/checkpoints" in info.name or info.name.endswith(".lock") else info


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs-root", type=Path, default=REPO / "runs")
    p.add_argument("--model", default="esm2_650m")
    p.add_argument("--cluster", default="local_gpu", help="local: a CPU check of this script")
    p.add_argument("--set", nargs="*", default=[], help="more key=value overrides for all runs")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--mbs", type=int, default=16)
    p.add_argument("--sleep", type=float, default=3.0, help="BIONEMO_STEP_SLEEP of the limited run")
    p.add_argument("--timeout", type=float, default=420)
    args = p.parse_args()
    deadline = time.monotonic() + args.timeout
    sys.path.insert(0, str(REPO))
    from launchers import cluster

    os.environ.update(cluster.slurm_env())  # scontrol/srun below talk to the bundled cluster
    args.out.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    up = sh(sys.executable, "-m", "launchers", "cluster", "up")
    log(
        f"cluster up rc={up.returncode} in {time.monotonic() - t:.1f}s: {up.stdout.strip()} {up.stderr.strip()}"
    )
    log(sh("scontrol", "show", "node", "node1").stdout.strip().replace("\n", " | "))
    gpus = ["--gpus-per-node=1"] if args.cluster == "local_gpu" else []
    probe = sh(
        "srun",
        "-N1",
        *gpus,
        "bash",
        "-c",
        "echo CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset} on $SLURMD_NODENAME; nvidia-smi -L",
    )
    log(f"srun probe rc={probe.returncode}: {probe.stdout.strip()} {probe.stderr.strip()[-500:]}")

    common = [
        f"trainer.train.max_steps={args.steps}",
        f"trainer.model.seq_length={args.seq_length}",
        f"trainer.train.micro_batch_size={args.mbs}",
        "trainer.train.log_every=1",
        "trainer.optim.warmup_steps=10",
        "trainer.checkpoint.every_steps=1000",
        "trainer.checkpoint.keep_last=1",
        "trainer.checkpoint.export_final=false",
        "trainer.train.compile=false",
        "cluster.python=benchmarks/slurm_gpu/timed_python.sh",
        *args.set,
    ]
    limited = [
        "job.time_limit=00:02:00",
        "cluster.signal_lead_s=30",
        f"cluster.env.BIONEMO_STEP_SLEEP={args.sleep}",
    ]
    runs, jobs = {}, {}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())  # a run directory is never reused
    for name, extra in (("limited", limited), ("ref1", []), ("ref2", [])):
        runs[name], jobs[name] = submit(args, f"{name}-{stamp}", common, extra)
    recs = wait_all(jobs, deadline)

    loss = {name: losses(d) if (d / "metrics.jsonl").exists() else {} for name, d in runs.items()}
    r1 = sorted((runs["limited"] / "logs").glob("train-*-r1.log"))
    resumed = re.search(r"resumed from \S+ \(step (\d+)", r1[-1].read_text()) if r1 else None
    at = int(resumed.group(1)) if resumed else None
    after = range(at + 1, args.steps + 1) if at is not None else range(0)
    summary = {
        "jobs": {
            n: {
                k: recs.get(n, {}).get(k)
                for k in (
                    "JobId",
                    "JobState",
                    "Restarts",
                    "ExitCode",
                    "SubmitTime",
                    "StartTime",
                    "EndTime",
                )
            }
            for n in jobs
        },
        "resumed_at_step": at,
        "after_restart": {
            "limited_vs_ref1": diff(loss["limited"], loss["ref1"], after),
            "ref2_vs_ref1": diff(loss["ref2"], loss["ref1"], after),
        },
        "before_restart": {
            "limited_vs_ref1": diff(loss["limited"], loss["ref1"], range(1, (at or 0) + 1)),
            "ref2_vs_ref1": diff(loss["ref2"], loss["ref1"], range(1, (at or 0) + 1)),
        },
        "all_steps": {"ref2_vs_ref1": diff(loss["ref2"], loss["ref1"], range(1, args.steps + 1))},
        "losses": {n: {str(s): v for s, v in sorted(steps.items())} for n, steps in loss.items()},
        "timings": {
            "limited_first_start": breakdown(runs["limited"], 0),
            "limited_restart": breakdown(runs["limited"], 1),
            "ref1_start": breakdown(runs["ref1"], 0),
            "ref2_start": breakdown(runs["ref2"], 0),
        },
        "config": {
            "steps": args.steps,
            "seq_length": args.seq_length,
            "micro_batch_size": args.mbs,
            "step_sleep_limited": args.sleep,
            "common_overrides": common,
            "limited_overrides": limited,
        },
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with tarfile.open(args.out / "runs.tar.gz", "w:gz") as tar:
        for name, d in runs.items():
            tar.add(d, arcname=name, filter=_no_checkpoints)
    log(
        json.dumps(
            {
                k: summary[k]
                for k in ("jobs", "resumed_at_step", "after_restart", "before_restart", "all_steps")
            },
            indent=1,
        )
    )
    for key, value in summary["timings"].items():
        log(f"{key}: " + json.dumps(value))
    done = all(recs.get(n, {}).get("JobState") == "COMPLETED" for n in jobs)
    return 0 if done and at is not None else 1


if __name__ == "__main__":
    sys.exit(main())
