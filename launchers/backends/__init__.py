"""Backends: one file each, chosen by `job.backend`. The submitit and NeMo-Run backends import
their libraries, which runs of the other backends do not need (NeMo-Run's imports torch, seconds
on its own), so they are imported only by the runs that use them."""

from __future__ import annotations

from launchers.backends.base import Backend, BackendError, Submission
from launchers.backends.local import LocalBackend
from launchers.backends.sbatch import SbatchBackend

NAMES = ("sbatch", "submitit", "nemo_run", "local")
# Backends whose runs are SLURM jobs: `status`, `cancel` and `resume` ask them about job ids.
SCHEDULED = ("sbatch", "submitit", "nemo_run")


def get(name: str) -> Backend:
    if name == "sbatch":
        return SbatchBackend()
    if name == "submitit":
        from launchers.backends.submitit_backend import SubmititBackend

        return SubmititBackend()
    if name == "nemo_run":
        from launchers.backends.nemo_run_backend import NemoRunBackend

        return NemoRunBackend()
    if name == "local":
        return LocalBackend()
    raise BackendError(f"unknown backend {name!r}; known: {', '.join(NAMES)}")


__all__ = ["Backend", "BackendError", "Submission", "NAMES", "SCHEDULED", "get"]
