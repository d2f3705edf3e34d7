"""A save that fails on one rank fails on every rank (bionemo/savefail.py): two real gloo
processes, one of which gets the write error; neither may wait for the other."""

from __future__ import annotations

import errno
import multiprocessing
import socket
from pathlib import Path

from bionemo.savefail import SaveFailed, agree_written, no_space_left


def _rank(rank: int, port: int, tmp: Path, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = {"all wrote": agree_written(None, tmp, 10, rank)}  # returns on both
    cases = {
        "nospace": OSError(errno.ENOSPC, "No space left on device"),
        "other": RuntimeError("file write failed"),
    }
    for name, error in cases.items():
        tmp.mkdir(exist_ok=True)
        try:  # only rank 1 failed: rank 0 must learn it here, not wait at the next barrier
            agree_written(error if rank == 1 else None, tmp, 20, rank)
            out[name] = "returned"
        except SaveFailed as e:
            out[name] = dict(
                ranks=e.ranks, disk_full=e.disk_full, removed=e.removed, detail=e.detail
            )
        # Rank 0 checks that its rmtree removed `tmp` after the all-reduce; without this barrier
        # rank 1 could already have made `tmp` again for the next case (seen once on a loaded CI
        # machine: removed False). Neither rank waits here for a failed save: both have returned.
        dist.barrier()
    results[rank] = out
    dist.destroy_process_group()


def test_one_rank_failing_fails_the_save_on_every_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tmp_path / "step-00000020.partial"
    ctx = multiprocessing.get_context("fork")  # torch is imported already: no second import
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_rank, args=(r, port, tmp, results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
        results = dict(results)
    for rank, res in results.items():
        assert res["all wrote"] is None
        assert res["nospace"]["ranks"] == [1] and res["nospace"]["disk_full"] is True, res
        assert res["nospace"]["detail"] == (
            "another rank failed" if rank == 0 else "OSError: [Errno 28] No space left on device"
        )
        assert res["other"]["ranks"] == [1] and res["other"]["disk_full"] is False, res
    assert results[0]["nospace"]["removed"] is True and results[1]["nospace"]["removed"] is None
    assert not tmp.exists()


def test_no_space_left_is_found_in_the_chain_or_on_the_filesystem(tmp_path):
    # torch's zip writer: a RuntimeError whose context holds the OSError
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598") from None
    except RuntimeError as e:
        wrapped = e
    assert no_space_left(wrapped, tmp_path)
    # no errno, and plenty of room: not a full disk
    assert not no_space_left(RuntimeError("iostream error"), tmp_path)
    assert not no_space_left(OSError(errno.EIO, "I/O error"), tmp_path)
