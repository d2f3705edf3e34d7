"""Shell injection on the bundled cluster (issue 13, defect 5): a REAL submit through submitit and
NeMo-Run with hostile-but-allowed strings (submitit: shell metacharacters in the experiment and
run names; both: a cluster.env value and an srun flag) runs to the end and creates no stray file
in the working directory, the run directory, the repository (the job's workdir), $HOME or /tmp.

One 1-node, 2-step job per backend, submitted together (~40 s on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from bionemo import rundir
from launchers import record

REPO = Path(__file__).resolve().parents[2]
TOKEN = f"pwn-{uuid.uuid4().hex[:8]}"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
SMALL = [
    "trainer.model.num_layers=2",
    "trainer.model.seq_length=128",
    "trainer.train.micro_batch_size=4",
    "trainer.train.limit_val_batches=0",
    "trainer.optim.warmup_steps=1",
    "max_steps=2",
    "trainer.checkpoint.every_steps=2",
]
ENV = f"$(touch {TOKEN}) `touch {TOKEN}`; touch {TOKEN} && 'q' \"dq\""
SRUN = f"--comment=$(touch {TOKEN});touch {TOKEN} 'q' `touch {TOKEN}`"
NAMES = {
    "submitit": (f"x$(touch {TOKEN})`touch {TOKEN}`", f"r;touch {TOKEN};x && 'q\" y"),
    "nemo_run": ("inj=1,a:b+c@d", "r.1-x_y"),
}  # NeMo-Run: plain words only (refused else)


def _strays(*roots: Path) -> list[Path]:
    found = [p for root in roots for p in root.rglob(TOKEN)]
    return found + [
        top / TOKEN for top in (Path.home(), Path("/tmp"), REPO) if (top / TOKEN).exists()
    ]


def test_real_submit_with_hostile_strings_creates_no_stray_file(slurm_cluster, tmp_path):
    cwd, runs = tmp_path / "cwd", tmp_path / "runs"
    cwd.mkdir()
    jobs = {}
    try:
        for backend, (experiment, run) in NAMES.items():
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "launchers",
                    "submit",
                    "--backend",
                    backend,
                    "--model",
                    "esm2_8m",
                    "--cluster",
                    "local",
                    "--nodes",
                    "1",
                    f"cluster.runs_root={runs}",
                    f"job.experiment={experiment}",
                    f"job.run={run}",
                    f"cluster.env.INJ={ENV}",
                    f"cluster.srun_args=[{json.dumps(SRUN)}]",
                    *SMALL,
                ],
                cwd=cwd,
                env=slurm_cluster.env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert out.returncode == 0, out.stdout + out.stderr
            run_dir = runs / experiment / run
            jobs[backend] = (run_dir, record.job_ids(record.load(run_dir))[-1])
        assert not _strays(cwd, runs), "injected at submit time"
        for backend, (run_dir, job_id) in jobs.items():
            rec = slurm_cluster.wait_job(job_id, FINAL, timeout=240, poll=1.0)
            logs = "\n".join(
                p.read_text(errors="replace")[-2000:]
                for p in sorted(run_dir.rglob("*.out")) + sorted(run_dir.rglob("*.log"))
            )
            assert rec["JobState"] == "COMPLETED", (backend, rec, logs)
            assert rundir.is_finished(run_dir), (backend, logs)  # the run dir reached the trainer
        assert not _strays(cwd, runs), "injected in the job"
    finally:
        for run_dir, job_id in jobs.values():
            if slurm_cluster.job(job_id).get("JobState") not in FINAL:
                slurm_cluster.cancel(job_id)
        for stray in _strays(cwd, runs):
            stray.unlink(missing_ok=True)
