"""Micro-batch sweeps through the launcher (`python -m launchers sweep`, `make sweep BACKEND=...`)
on the bundled SLURM cluster: ONE job per sweep, whose allocation (2 nodes, one rank each, gloo)
runs the sweep (launchers/sweeping/) once; every trial is an srun step of that job, never a job of its own.

- sbatch: the CPU search under a real address-space limit finds the exact boundary. The limit is
  calibrated here as in tests/test_sweep.py (halfway between the peak address space of micro
  batch 8 and 16), but at the trials' world size 2 and from the trials' own trainer config: the
  run's resolved config, read from the launcher's dry run.
- submitit: the sweep runs as submitit's one task on the first node; its trial steps overlap
  that step (one trial, the cheap case).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launchers.sweeping import orchestrator as sweep
from tests.test_sweep import TINY_MODEL, vm_peaks

REPO = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
# The cheap case: a model of a few thousand parameters at 32 tokens, a second a trial.
SMALL_MODEL = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.ffn_hidden_size=64",
    "model.seq_length=32",
    "train.device=cpu",
]
CALIBRATION = (8, 16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    subprocess.run(
        [sys.executable, "-m", "bionemo.data.sample", "--out", str(out), "--clusters", "200"],
        check=True,
        capture_output=True,
    )
    return out


def sweep_args(tmp: Path, data: Path, backend: str, model: list[str], *extra: str) -> list[str]:
    return [
        "sweep",
        "--model",
        "esm2_8m",
        "--cluster",
        "local",
        "--nodes",
        "2",
        "--backend",
        backend,
        "--gpu-name",
        "cpu",
        "--recompute",
        "none",
        "--warmup-steps",
        "1",
        "--steps",
        "1",
        "--out",
        str(tmp / "out"),
        f"cluster.runs_root={tmp / 'runs'}",
        f"job.run={backend}",
        *extra,
        "--set",
        *model,
        f"data.train_clusters={data / 'train_clusters.parquet'}",
        "data.valid_clusters=null",
        f"data.database={data / 'proteins.sqlite'}",
    ]


def launcher(*args: str, slurm) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "launchers", *args],
        cwd=REPO,
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def submit(args: list[str], slurm) -> tuple[Path, str]:
    out = launcher(*args, slurm=slurm)
    job_id, run_dir = re.search(r"submitted job (\d+): (\S+)", out.stdout).groups()
    return Path(run_dir), job_id


def wait(slurm, job_id: str, run_dir: Path, timeout: float) -> dict:
    try:
        rec = slurm.wait_job(job_id, FINAL, timeout=timeout)
    finally:
        slurm.cancel(job_id)
    logs = "\n".join(p.read_text() for p in sorted(run_dir.rglob("*.out")))
    assert rec["JobState"] == "COMPLETED", (rec, logs)
    return rec


def check_one_allocation(result: dict, job_id: str, nodes: tuple[str, ...]) -> None:
    """Every trial was one srun step of the sweep's job, its two ranks on two nodes."""
    assert result["inside_allocation"] and result["world_size"] == 2
    assert result["slurm_job_id"] == job_id
    steps = set()
    for trial in result["trials"]:
        run_dir = Path(trial["run_dir"])
        assert (run_dir / "srun.log").read_text().startswith("srun ")
        seen = set()
        for rank in (0, 1):
            log = (run_dir / f"rank{rank}.log").read_text()
            seen |= set(
                re.findall(
                    rf"\[sweep\] rank {rank} of 2 on \S+ \(node (\S+), step "
                    rf"{job_id}\.(\d+)\)",
                    log,
                )
            )
        (step,) = {s for _, s in seen}  # both ranks in the same step of this job
        steps.add(step)
        used = {node for node, _ in seen}
        assert len(used) == 2 and used <= set(nodes), used
    assert len(steps) == len(result["trials"])  # one step per trial


def test_sbatch_sweep_finds_the_real_limit_in_one_allocation(slurm_cluster, tmp_path, data_dir):
    args = sweep_args(tmp_path, data_dir, "sbatch", TINY_MODEL, "--min", "8", "--max", "32")
    # The trials' trainer config: the resolved config the job will get (the dry run prints it).
    dry = launcher(*args, "--dry-run", slurm=slurm_cluster).stdout
    resolved = yaml.safe_load(dry.split("# ==== config.yaml -> ", 1)[1].split("\n", 1)[1])
    assert resolved["sweep"]["min"] == 8 and resolved["trainer"]["train"]["precision"] == "fp32"
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"trainer": resolved["trainer"]}))
    calibrate = sweep.parse_args(
        [
            "--model",
            "esm2_8m",
            "--base-config",
            str(base),
            "--cpu-memory-limit-gib",
            "1",
            "--warmup-steps",
            "1",
            "--steps",
            "1",
        ]
    )
    # the batch script's environment (the local profile's) and two ranks, as in the trials
    peaks = vm_peaks(
        tmp_path,
        calibrate,
        CALIBRATION,
        world=2,
        env={"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"},
    )
    lo, hi = CALIBRATION
    assert (peaks[hi] - peaks[lo]) / (hi - lo) > 5 * 2**20, peaks  # activations dominate
    limit_gib = (peaks[lo] + peaks[hi]) / 2 / 2**30
    print(f"VmPeak at world size 2 {peaks}; limit {limit_gib:.3f} GiB")

    run_dir, job_id = submit([*args, "--cpu-memory-limit-gib", f"{limit_gib:.4f}"], slurm_cluster)
    assert (run_dir / "sweep.sbatch").is_file() and not (run_dir / "train.sbatch").exists()
    assert json.loads((run_dir / "submission.json").read_text())["kind"] == "sweep"
    wait(slurm_cluster, job_id, run_dir, timeout=360)

    result = json.loads((run_dir / "results" / "esm2_8m.json").read_text())
    assert result == json.loads((tmp_path / "out" / "cpu" / "esm2_8m.json").read_text())
    trials = {t["micro_batch_size"]: t for t in result["trials"]}
    best = result["policies"]["none"]["max_micro_batch_size"]
    assert lo <= best < hi, (peaks, limit_gib, trials)  # as calibrated
    assert trials[best]["fits"] and not trials[best + 1]["fits"]  # the bisection's boundary
    assert max(m for m, t in trials.items() if t["fits"]) == best
    assert min(m for m, t in trials.items() if not t["fits"]) == best + 1  # monotone
    for m, t in trials.items():
        log = (Path(t["run_dir"]) / "rank0.log").read_text() + (
            Path(t["run_dir"]) / "rank1.log"
        ).read_text()
        if not t["fits"]:  # a real allocation failure, reported as out of memory (exit 12)
            assert "can't allocate memory" in log and "out of memory" in log, log[-2000:]
            codes = [f.read_text().strip() for f in Path(t["run_dir"]).glob("rank*.rc")]
            assert "12" in codes, codes  # (srun kills the other rank: it may have none)
    for ext in ("csv", "md", "json", "_throughput.png", "_memory.png"):
        name = f"esm2_8m{ext}" if ext.startswith("_") else f"esm2_8m.{ext}"
        assert (run_dir / "results" / name).stat().st_size > 0
    check_one_allocation(result, job_id, slurm_cluster.nodes)
    for trial in result["trials"]:  # the batch shell is no step: the trials need no --overlap
        assert "--overlap" not in (Path(trial["run_dir"]) / "srun.log").read_text()


def test_submitit_sweep_runs_its_trials_beside_its_own_step(slurm_cluster, tmp_path, data_dir):
    args = sweep_args(tmp_path, data_dir, "submitit", SMALL_MODEL, "--min", "2", "--max", "2")
    run_dir, job_id = submit(args, slurm_cluster)
    wait(slurm_cluster, job_id, run_dir, timeout=180)

    result = json.loads((run_dir / "results" / "esm2_8m.json").read_text())
    (trial,) = result["trials"]
    assert trial["fits"] and trial["tokens_per_s_per_gpu"] > 0
    check_one_allocation(result, job_id, slurm_cluster.nodes)
    assert "--overlap" in (Path(trial["run_dir"]) / "srun.log").read_text()
    (task_log,) = (run_dir / "submitit").glob(f"{job_id}_0_log.out")  # one task: the sweep
    assert "[sweep] ddp none: largest micro batch that fits: 2" in task_log.read_text()
    status = launcher("status", str(run_dir), slurm=slurm_cluster).stdout
    assert "result    none: largest micro batch 2" in status, status
