"""Backends: one file each, chosen by `job.backend`. Imported lazily so that `status` of a local
run never loads jinja2, and the CLI stays fast."""

from __future__ import annotations

from launchers.backends.base import Backend, BackendError, Submission

NAMES = ("sbatch", "local")


def get(name: str) -> Backend:
    if name == "sbatch":
        from launchers.backends.sbatch import SbatchBackend

        return SbatchBackend()
    if name == "local":
        from launchers.backends.local import LocalBackend

        return LocalBackend()
    raise BackendError(f"unknown backend {name!r}; known: {', '.join(NAMES)}")


__all__ = ["Backend", "BackendError", "Submission", "NAMES", "get"]
