"""A failed save: every rank learns that some rank could not write its part.

A save is collective: a rank whose write fails (a full disk, most often) and simply raises leaves
the others waiting at the commit barrier until the process group times out (30 min). So after the
write phase the ranks all-reduce their outcomes, and when any rank failed, rank 0 removes the
partial folder (freeing what it took, so the batch script and the requeue decision can still write
on that filesystem) and every rank raises the same `SaveFailed`. The trainer turns one whose cause
is "no space left" into its disk-full exit code.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

# What a write phase may raise: DCP's CheckpointException (each rank's error, gathered and
# broadcast by DCP itself) is a BaseException, not an Exception.
WRITE_ERRORS = (Exception, CheckpointException)
# After a failed write, a filesystem with less than this available counts as full: a write that
# does not fit fills the device to its last block before it fails, and torch's zip writer (used
# by DCP) reports that as a RuntimeError without the errno.
NEARLY_FULL_BYTES = 1 << 20

WRITTEN, FAILED, NO_SPACE = 0, 1, 2  # a rank's outcome, all-reduced


class SaveFailed(Exception):
    """The save of `step` failed on `ranks`; raised on every rank."""

    def __init__(
        self,
        *,
        step: int,
        path: Path,
        ranks: list[int],
        disk_full: bool,
        detail: str,
        free: int | None,
        removed: bool | None,
    ):
        self.step, self.path, self.ranks, self.disk_full = step, Path(path), ranks, disk_full
        # free: bytes left when it failed; removed: the partial folder is gone (None: not rank 0)
        self.detail, self.free_bytes, self.removed = detail, free, removed
        self.filesystem = mount_point(path)
        what = "no space left on device" if disk_full else "write failed"
        super().__init__(
            f"saving step {step} to {path} failed on rank(s) "
            f"{', '.join(map(str, ranks))}: {what} ({detail})"
        )


def agree_written(error: BaseException | None, tmp: Path, step: int, rank: int) -> None:
    """Every rank's outcome to every rank (one all-reduce of a world-sized vector); return when
    all wrote their part, else remove `tmp` (rank 0) and raise SaveFailed everywhere."""
    code = WRITTEN if error is None else NO_SPACE if no_space_left(error, tmp) else FAILED
    codes = [code]
    if dist.is_available() and dist.is_initialized():
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        t = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
        t[dist.get_rank()] = code
        dist.all_reduce(t)
        codes = t.tolist()
    if not any(codes):
        return
    free = free_bytes(tmp)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise SaveFailed(
        step=step,
        path=tmp,
        ranks=[r for r, c in enumerate(codes) if c],
        disk_full=NO_SPACE in codes,
        free=free,
        removed=not tmp.exists() if rank == 0 else None,
        detail=one_line(error) if error is not None else "another rank failed",
    )


def one_line(error: BaseException) -> str:
    """The innermost error in one line (DCP's exception holds each rank's error + traceback)."""
    failures = getattr(error, "failures", None)  # CheckpointException: {rank: (error, trace)}
    if failures:
        error = next(iter(failures.values()))[0]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def no_space_left(error: BaseException, path: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the error's chain (or in DCP's per-rank errors), or a failed
    write on a filesystem that has (almost) nothing left."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        failures = getattr(e, "failures", None) or {}
        todo += [e.__cause__, e.__context__, *(f[0] for f in failures.values())]
    free = free_bytes(path)
    return free is not None and free < NEARLY_FULL_BYTES


def free_bytes(path: Path) -> int | None:
    """Bytes available to this user on the filesystem holding `path` (or its nearest parent)."""
    for p in (Path(path), *Path(path).parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def mount_point(path: Path) -> str:
    """The mount point of the filesystem holding `path`: the name a user recognises."""
    p = Path(os.path.abspath(path))
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)
