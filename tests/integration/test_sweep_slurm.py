"""A micro-batch sweep inside ONE allocation of the bundled SLURM cluster: every trial is an srun
step of the same job (2 nodes, one rank each, gloo), never a job of its own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

TINY_MODEL = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
              "model.ffn_hidden_size=64", "model.seq_length=32", "train.device=cpu"]


def test_sweep_runs_inside_one_allocation(slurm_cluster, repo_root, tmp_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "bionemo.data.sample", "--out", str(data),
                    "--clusters", "200"], check=True, capture_output=True)
    out, work, log = tmp_path / "out", tmp_path / "work", tmp_path / "job.out"
    sweep = [
        sys.executable, "-m", "benchmarks.sweep", "--inside-allocation", "--nodes", "2",
        "--gpus-per-trial", "1", "--model", "esm2_8m", "--gpu-name", "cpu",
        "--min", "2", "--max", "8", "--steps", "2", "--warmup-steps", "1", "--out", str(out),
        "--work-dir", str(work), "--set", *TINY_MODEL,
        f"data.train_clusters={data / 'train_clusters.parquet'}", "data.valid_clusters=null",
        f"data.database={data / 'proteins.sqlite'}",
    ]
    script = ("#!/bin/bash\nset -euo pipefail\n"
              f"cd {repo_root}\n"
              "export OMP_NUM_THREADS=1\n"  # 2 ranks on a 2-core machine
              f"{' '.join(sweep)}\n")
    job_id = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--time=5",
                                  "-J", "sweep-test", "-o", str(log), script=script)
    try:
        record = slurm_cluster.wait_job(
            job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"},
            timeout=240)
    finally:
        slurm_cluster.cancel(job_id)
    text = log.read_text() if log.exists() else ""
    assert record["JobState"] == "COMPLETED", (record, text)

    result = json.loads((out / "cpu" / "esm2_8m.json").read_text())
    assert result["inside_allocation"] and result["world_size"] == 2
    assert {p: s["max_micro_batch_size"] for p, s in result["policies"].items()} == \
        {"none": 8, "selective": 8, "full": 8}
    assert [t["micro_batch_size"] for t in result["trials"] if t["recompute"] == "none"] == \
        [2, 4, 8]
    for ext in ("csv", "md", "json"):
        assert (out / "cpu" / f"esm2_8m.{ext}").is_file()
    for plot in ("throughput", "memory"):
        assert (out / "cpu" / f"esm2_8m_{plot}.png").is_file()
    # Every trial was one srun step of this job, its two ranks on two different nodes.
    for trial in result["trials"]:
        run_dir = Path(trial["run_dir"])
        assert trial["fits"] and trial["tokens_per_s_per_gpu"] > 0
        assert (run_dir / "srun.log").read_text().startswith("srun ")
        nodes = set()
        for rank in (0, 1):
            rank_log = (run_dir / f"rank{rank}.log").read_text()
            nodes |= set(re.findall(rf"\[sweep\] rank {rank} of 2 on \S+ \(node (\S+)\)", rank_log))
            assert (run_dir / f"rank{rank}.rc").read_text().strip() == "0"
        assert len(nodes) == 2 and nodes <= set(slurm_cluster.nodes), nodes
