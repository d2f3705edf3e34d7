"""A recipe on the bundled cluster: `launchers recipe` -> edit one key -> `submit --config` (sbatch,
2 nodes) -> the job runs the edit; a bad edit of the same file never reaches the queue."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bionemo import rundir
from launchers import config
from tests.integration._runs import FINAL, REPO, SMALL, assert_finished, logs

DATA = REPO / "data" / "sample"


def test_recipe_edit_submit_runs_the_edit_and_a_bad_edit_stays_out_of_the_queue(
    slurm_cluster, tmp_path
):
    def launchers(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "launchers", *args],
            cwd=tmp_path,
            env=slurm_cluster.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    recipe = tmp_path / "my.yaml"
    made = launchers(
        "recipe",
        "--model",
        "esm2_8m",
        "--cluster",
        "local",
        "--nodes",
        "2",
        f"cluster.runs_root={tmp_path}/runs",
        "job.experiment=recipe",
        *SMALL,
        "max_steps=6",
        "trainer.checkpoint.every_steps=1000",
        "trainer.checkpoint.export_final=false",
        "--out",
        str(recipe),
    )
    assert made.returncode == 0, made.stderr
    text = recipe.read_text()
    assert re.search(r"^    max_steps: 6 +# command line$", text, re.M)

    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("\n    max_steps: 6 ", "\n    max_stepz: 6 "))
    before = slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split()
    refused = launchers("submit", "--config", str(bad))
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: {bad}: trainer.train.max_stepz: unknown key")
    assert not (tmp_path / "runs").exists()
    assert set(slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split()) <= set(before)

    recipe.write_text(text.replace("\n    max_steps: 6 ", "\n    max_steps: 3 "))
    done = launchers("submit", "--config", str(recipe))
    assert done.returncode == 0, done.stdout + done.stderr
    job_id, run_dir = re.search(r"submitted job (\d+): (\S+)", done.stdout).groups()
    run_dir = Path(run_dir)
    try:
        saved = config.load_resolved(run_dir / rundir.CONFIG)
        assert saved["trainer"]["train"]["max_steps"] == 3 and saved["job"]["nodes"] == 2
        rec = slurm_cluster.wait_job(job_id, FINAL, timeout=240, poll=1.0)
    finally:
        slurm_cluster.cancel(job_id)  # a no-op once it has ended
    assert rec["JobState"] == "COMPLETED", logs(run_dir)
    assert_finished(run_dir, 3)
