"""Asynchronous periodic saves (checkpoint.async_save): written in the background, committed only
once every rank's write finished; exact resume; a kill during the background write leaves the
previous checkpoint the one that resumes. Real processes on CPU (gloo)."""

from __future__ import annotations

import json
import re
import signal

from bionemo import rundir
from tests.test_resume import (
    MAX_STEPS,
    assert_bitwise_equal,
    data_dir,  # noqa: F401 -- the module's fixture
    final_state,
    launch,
    make_run,
    train_losses,
    wait_all,
)


def checkpoint_records(run) -> list[dict]:
    lines = (run / rundir.METRICS).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "checkpoint"]


def make_async(path, data_dir):
    run = make_run(path, data_dir)
    cfg = (
        (run / rundir.CONFIG)
        .read_text()
        .replace("every_steps: 10", "every_steps: 10\n    async_save: true")
    )
    assert "async_save: true" in cfg
    (run / rundir.CONFIG).write_text(cfg)
    return run


def test_async_saves_commit_and_match_synchronous_ones(tmp_path, data_dir):  # noqa: F811
    ref = make_run(tmp_path / "sync", data_dir)
    run = make_async(tmp_path / "async", data_dir)
    procs = launch(ref, world=2) + launch(run, world=2)
    assert wait_all(procs) == [0, 0, 0, 0]
    assert train_losses(run) == train_losses(ref)
    assert_bitwise_equal(final_state(run, tmp_path), final_state(ref, tmp_path))
    records = {r["step"]: r for r in checkpoint_records(run)}
    # periodic saves went to the background; the last one is synchronous
    assert [s for s, r in sorted(records.items()) if r["async"]] == [10, 20, 30]
    assert records[MAX_STEPS]["async"] is False
    log = (run / "rank0.log").read_text()
    assert "written in the background" in log  # committed by poll(), not only by the next save
    # the commit's checksums (and fsyncs) were made by the writer's thread, none in the loop
    claimed = re.findall(r"manifest of step-\d+\.partial: (\d+) of (\d+) files checksummed", log)
    assert claimed and all(a == b for a, b in claimed), claimed
    steps, incomplete = rundir.checkpoint_steps(run)
    assert steps == [30, 40] and not incomplete  # keep_last 2; every committed folder complete
    assert all((rundir.step_dir(run, s) / rundir.MANIFEST).is_file() for s in steps)
    # DDP: each rank staged (and wrote) about half of the state, not all of it
    for rank in (0, 1):
        text = (run / f"rank{rank}.log").read_text()
        part, whole = map(float, re.findall(rf"rank {rank} stages (\S+) of the (\S+) GB", text)[0])
        assert 0.3 < part / whole < 0.7, (rank, part, whole)
    shards = sorted(f.stat().st_size for f in rundir.step_dir(run, 30).glob("__*.distcp"))
    assert len(shards) == 2 and shards[0] > 0.5 * shards[1], shards


def test_kill_during_background_write_resumes_from_the_previous(tmp_path, data_dir):  # noqa: F811
    """2 DDP ranks: the checkpoint that resumes was written by both, each its part of the state."""
    ref = make_run(tmp_path / "uninterrupted", data_dir)
    run = make_async(tmp_path / "killed", data_dir)
    procs = launch(ref, world=2) + launch(run, world=2, BIONEMO_KILL_DURING_SAVE="20")
    assert wait_all(procs) == [0, 0, -signal.SIGKILL, -signal.SIGKILL]
    steps, incomplete = rundir.checkpoint_steps(run)
    assert steps == [10] and [d.name for d in incomplete] == ["step-00000020.partial"]
    assert wait_all(launch(run, world=2)) == [0, 0]
    assert "resumed from" in (run / "rank0.log").read_text()
    assert train_losses(run) == train_losses(ref)
    assert_bitwise_equal(final_state(run, tmp_path), final_state(ref, tmp_path))


def test_disk_full_during_a_background_write_stops_with_28(tmp_path, data_dir):  # noqa: F811
    from bionemo.rundir import DISK_FULL_EXIT_CODE, read_events
    from tests.test_requeue import small_filesystem

    # one checkpoint's size, measured: a synchronous run of 10 steps saves exactly one
    sized = make_run(tmp_path / "sized", data_dir, max_steps=10)
    assert wait_all(launch(sized, world=1)) == [0]
    one = sum(f.stat().st_size for f in rundir.step_dir(sized, 10).rglob("*") if f.is_file())
    run = make_async(tmp_path / "full", data_dir)
    # room for the step-10 checkpoint (kept: keep_last 2) but not for step 20's beside it
    with small_filesystem(int(one * 1.5) // 1024 + 64) as mnt:
        (run / rundir.CHECKPOINTS).symlink_to(mnt, target_is_directory=True)
        assert wait_all(launch(run, world=1)) == [DISK_FULL_EXIT_CODE]
        steps, _ = rundir.checkpoint_steps(run)
        assert steps == [10]  # the older checkpoint stays, intact and committed
        assert not (mnt / "step-00000020.partial").exists()  # the failed one is removed
    log = (run / "rank0.log").read_text()
    assert "no space left on device" in log, log[-3000:]
    assert any(e["event"] == "disk_full" and e["step"] == 20 for e in read_events(run))


def test_the_kept_stager_survives_being_closed_between_saves(tmp_path):
    """torch 2.11's async_save closes the stager it is handed after a write; the second async
    save on an H200 then failed with KeyError: <class 'type'>. Close it the ways a torch may
    (outer close, inner close, tables emptied) between two real dcp.async_save calls."""
    import torch
    import torch.distributed.checkpoint as dcp

    from bionemo.engines.torch_engine import _kept_stager

    stager = _kept_stager(torch.device("cpu"))
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict()}

    def close_it(k: int) -> None:
        if k == 0:
            stager.close()
            stager._state_dict_stager.close()
        else:  # emptied some other way: the next save renews the inner stager
            stager._state_dict_stager._deepcopy_dispatch.clear()

    for k in range(3):
        dcp.async_save(state, checkpoint_id=tmp_path / f"s{k}", async_stager=stager).result()
        loaded = {"model": model.state_dict()}
        dcp.load(loaded, checkpoint_id=tmp_path / f"s{k}")
        assert all(torch.equal(loaded["model"][n], v) for n, v in model.state_dict().items())
        close_it(k)


def test_a_stager_emptied_unnoticed_is_replaced_for_that_save(tmp_path, caplog):
    """The last line of defence: staging fails with the emptied stager's KeyError although the
    tables are not empty (a torch that closes differently); the save is staged again."""
    import torch
    import torch.distributed.checkpoint as dcp

    from bionemo.engines.torch_engine import AsyncSaver

    saver = AsyncSaver(torch.device("cpu"))
    model = torch.nn.Linear(4, 3)
    state = {"model": model.state_dict(), "step": {"n": 7}}
    saver.save(state, tmp_path / "a").result()
    first = saver.stager
    first._state_dict_stager._deepcopy_dispatch.pop(type)  # what close() leaves, in part
    first._state_dict_stager._deepcopy_dispatch.pop(dict)  # dicts now copied by reduction
    saver.save(state, tmp_path / "b").result()
    assert saver.stager is not first and "staging again with a new stager" in caplog.text
    loaded = {"model": model.state_dict(), "step": {"n": 0}}
    dcp.load(loaded, checkpoint_id=tmp_path / "b")
    assert loaded["step"]["n"] == 7
