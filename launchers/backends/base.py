"""What a backend is: the few hooks the launcher core (launchers/cli.py) calls.

    files(spec)                 files to write into the run directory, besides config.yaml
    describe(spec)              what `render` prints: the batch script, or the command line
    submit(spec)                start the run (its directory is written); return a Submission
    resubmit(run_dir, saved)    start an existing run again (`resume`)
    states(run_dir, saved, ids) scheduler state of each job id (for `status`)
    cancel(run_dir, saved, ids) stop the run's jobs

`saved` is the run's config.yaml as a plain dict (status and cancel stay independent of the
schema, so old runs remain readable). A backend raises BackendError when the scheduler refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from launchers.spec import JobSpec


# A SLURM job that the controller no longer knows: how `states` says it (status and list read it).
GONE = "gone from the controller"


class BackendError(RuntimeError):
    """The scheduler (or the local process) refused or failed; the message says what it said."""


@dataclass
class Submission:
    job_id: str | None  # the scheduler's id; None for the local backend
    exit_code: int | None = None  # the local backend's trainer exit code
    scheduler_s: float = 0.0  # seconds spent waiting for the scheduler (sbatch) itself
    notes: list[str] = field(default_factory=list)


class Backend:
    name = "base"

    def files(self, spec: JobSpec) -> dict[str, str]:
        return {}

    def describe(self, spec: JobSpec) -> str:
        raise NotImplementedError

    def submit(self, spec: JobSpec) -> Submission:
        raise NotImplementedError

    def resubmit(self, run_dir: Path, saved: dict) -> Submission:
        raise NotImplementedError

    def states(self, run_dir: Path, saved: dict, job_ids: list[str]) -> dict[str, str]:
        return {}

    def cancel(self, run_dir: Path, saved: dict, job_ids: list[str]) -> list[str]:
        return []
