"""The NeMo-Run backend on the bundled SLURM cluster: real `python -m launchers submit --backend
nemo_run`, a NeMo-Run Experiment on run.SlurmExecutor with a LocalTunnel, 2 nodes.

- a time-limited 2-node run: the warning signal reaches every rank, they save through the stop
  protocol and exit 75; the project's requeue decision (rendered into NeMo-Run's setup_lines hook)
  requeues; the job resumes and finishes with weights identical to an uninterrupted run (the
  shared reference, submitted through the native backend);
- `status`, `logs` and `cancel` of a second, running job, through the NeMo-Run experiment.

The slow runs are shared with test_submitit.py and overlap (tests/integration/_runs.py).
"""

from __future__ import annotations

from launchers import record
from tests.integration._runs import (  # noqa: F401 -- `runs` is a fixture
    check_status_logs_cancel,
    check_time_limit_run,
    runs,
)

BACKEND = "nemo_run"


def test_nemo_run_status_logs_and_cancel(runs):
    run_dir = check_status_logs_cancel(runs, BACKEND)
    # the run is a NeMo-Run experiment of its own NEMORUN_HOME, found by its handle
    (handle,) = record.load(run_dir)["nemo_run"].values()
    assert handle["task"] == "train" and (run_dir / "nemo-run" / "experiments").is_dir()
    assert (run_dir / "nemo-run" / ".slurm_jobs").is_file()


def test_nemo_run_time_limit_requeues_and_resumes_exactly(runs, tmp_path):
    run_dir, rec = check_time_limit_run(runs, BACKEND, tmp_path)
    batch = next((run_dir / "logs").glob(f"sbatch_*_{rec['JobId']}.out")).read_text()
    # NeMo-Run's own retry rule stayed off; the project's decision ran after srun
    assert "TORCHX_MAX_RETRIES=0" in batch and "launchers.requeue" in batch
    assert "[launcher] decision: requeue" in batch, batch[-3000:]
