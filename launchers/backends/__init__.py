"""Backends: one file each, chosen by `job.backend`. Imported lazily so that `status` of a local
run never loads jinja2, and the CLI stays fast (submitit and NeMo-Run are imported only by runs
that use them; NeMo-Run alone takes seconds to import)."""

from __future__ import annotations

from launchers.backends.base import Backend, BackendError, Submission

NAMES = ("sbatch", "submitit", "nemo_run", "local")
# Backends whose runs are SLURM jobs: `status`, `cancel` and `resume` ask them about job ids.
SCHEDULED = ("sbatch", "submitit", "nemo_run")


def get(name: str) -> Backend:
    if name == "sbatch":
        from launchers.backends.sbatch import SbatchBackend

        return SbatchBackend()
    if name == "submitit":
        from launchers.backends.submitit_backend import SubmititBackend

        return SubmititBackend()
    if name == "nemo_run":
        from launchers.backends.nemo_run_backend import NemoRunBackend

        return NemoRunBackend()
    if name == "local":
        from launchers.backends.local import LocalBackend

        return LocalBackend()
    raise BackendError(f"unknown backend {name!r}; known: {', '.join(NAMES)}")


__all__ = ["Backend", "BackendError", "Submission", "NAMES", "SCHEDULED", "get"]
