"""The submitit backend on the bundled SLURM cluster: real `python -m launchers submit --backend
submitit`, a submitit Checkpointable job on 2 nodes.

- a time-limited 2-node run: SLURM's warning signal reaches the trainers and submitit's handler,
  the ranks save through the stop protocol, `TrainerJob.checkpoint()` applies the project's requeue
  policy and submitit requeues; the job resumes and finishes with weights identical to an
  uninterrupted run (the shared reference, submitted through the native backend);
- `status`, `logs` and `cancel` of a second, running job, through submitit's handles.

The slow runs are shared with test_nemo_run.py and overlap (tests/integration/_runs.py).
"""

from __future__ import annotations

from launchers import record
from tests.integration._runs import (  # noqa: F401 -- `runs` is a fixture
    check_status_logs_cancel,
    check_time_limit_run,
    runs,
)

BACKEND = "submitit"


def test_submitit_status_logs_and_cancel(runs):
    run_dir = check_status_logs_cancel(runs, BACKEND)
    # submitit's own layout: its pickles and one log per task in <run>/submitit
    assert list((run_dir / "submitit").glob("*_submitted.pkl"))
    assert list((run_dir / "submitit").glob("*_1_log.out"))


def test_submitit_time_limit_requeues_and_resumes_exactly(runs, tmp_path):
    run_dir, rec = check_time_limit_run(runs, BACKEND, tmp_path)
    # the decision came from submitit's checkpoint() on rank 0, and submitit requeued
    attempts = record.load(run_dir)["attempts"]
    assert "checkpoint()" in attempts[0]["via"], attempts
    job_id = rec["JobId"]
    rank0 = (run_dir / "submitit" / f"{job_id}_0_log.out").read_text()
    assert "Calling checkpoint method" in rank0 and f"Requeued job {job_id}" in rank0, rank0
