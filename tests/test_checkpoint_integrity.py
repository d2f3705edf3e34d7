"""Damaged checkpoints: real trainer processes (2 gloo ranks, CPU) resume from checkpoints whose
files were flipped, truncated or replaced, and must take the newest intact one, say which file
failed, or stop; never train on the damaged state and never start over from step 0.

One uninterrupted run (steps 4, 8, 12 and 16 saved) is the reference; each test copies it and
removes `finished` (and the steps after 8 where a test damages only 8 and 4: what a run killed
before its later saves leaves), damages checkpoints, resumes and compares. The three kinds of
damage that fall back (flipped bytes, a truncated shard, a planted pickle) share one resume:
each hits its own step (12, 16, 8), and the run must reject all three and resume from step 4.
"""

from __future__ import annotations

import json
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bionemo import rundir
from bionemo.checkpoint import _load_rng, _rng_state, _set_rng_state
from tests.test_resume import (  # noqa: F401 -- data_dir is a fixture
    assert_bitwise_equal,
    data_dir,
    launch,
    make_run,
    train_losses,
    wait_all,
)

STEPS, EVERY, WORLD = 16, 4, 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:  # noqa: F811 -- data_dir is a fixture
    ref = make_run(tmp_path_factory.mktemp("ref") / "run", data_dir, max_steps=STEPS, val_every=100)
    cfg = yaml.safe_load((ref / rundir.CONFIG).read_text())
    cfg["trainer"]["checkpoint"] = {"every_steps": EVERY, "keep_last": 4}
    (ref / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
    assert wait_all(launch(ref, world=WORLD)) == [0] * WORLD
    assert rundir.checkpoint_steps(ref)[0] == [4, 8, 12, 16]
    return ref


def interrupted_copy(reference: Path, tmp_path: Path, last: int = 8) -> Path:
    """The reference without `finished` and without the checkpoints after step `last`."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for step in range(last + EVERY, STEPS + 1, EVERY):
        shutil.rmtree(rundir.step_dir(run, step))
    (run / rundir.FINISHED).unlink()
    for log in run.glob("rank*.log"):
        log.unlink()
    return run


def weights(run: Path, tmp: Path) -> dict:
    out = tmp / f"{run.parent.name}-{run.name}.pt"
    dcp_to_torch_save(rundir.step_dir(run, STEPS), out)
    return torch.load(out, weights_only=False)


def largest_shard(step: Path) -> Path:
    return max(step.glob("*.distcp"), key=lambda f: f.stat().st_size)


def flip(f: Path, n: int = 64) -> None:
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    f.write_bytes(bytes(data))


def truncate(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def rejections(run: Path) -> list[tuple[int, str]]:
    return [
        (e["step"], e["file"])
        for e in rundir.read_events(run)
        if e["event"] == "checkpoint_rejected"
    ]


class _Payload:
    """Unpickling this calls open(path, "w"): creates a file, as any planted code could."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant_pickle(step: Path, pwned: Path) -> Path:
    """Replace rank 0's RNG file with a pickle that would create `pwned`, with a matching manifest
    entry, so the loader itself must refuse it (not only the checksum)."""
    rng = step / "rng-rank00000.pt"
    torch.save({"python": _Payload(pwned), "numpy": None, "torch": None}, rng)
    manifest = json.loads((step / rundir.MANIFEST).read_text())
    manifest["files"][rng.name] = {
        "size": rng.stat().st_size,
        "crc32": f"{zlib.crc32(rng.read_bytes()):08x}",
    }
    (step / rundir.MANIFEST).write_text(json.dumps(manifest))
    return rng


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(reference, tmp_path):
    """Step 16 truncated, step 12 with flipped bytes, step 8 with a planted pickle: each is
    rejected, naming its file and why, and the run resumes from step 4 and ends exact."""
    run = interrupted_copy(reference, tmp_path, last=STEPS)
    truncated = largest_shard(rundir.step_dir(run, 16))
    truncate(truncated)
    size = truncated.stat().st_size  # before the resumed run saves step 16 anew
    flipped = largest_shard(rundir.step_dir(run, 12))
    flip(flipped)
    pwned = tmp_path / "pwned"
    rng = plant_pickle(rundir.step_dir(run, 8), pwned)

    assert wait_all(launch(run, world=WORLD)) == [0] * WORLD
    log = (run / "rank0.log").read_text()
    assert f"step-00000016 rejected: {truncated.name}: {size} bytes" in log
    assert f"step-00000012 rejected: {flipped.name}: crc32 " in log
    assert f"step-00000008 rejected: {rng.name}: UnpicklingError" in log
    assert f"resumed from {rundir.step_dir(run, 4)} " in log
    assert rejections(run) == [(16, truncated.name), (12, flipped.name), (8, rng.name)]
    assert not pwned.exists()
    assert rundir.is_finished(run)
    assert train_losses(run) == train_losses(reference)
    assert_bitwise_equal(weights(run, tmp_path), weights(reference, tmp_path))


def test_all_checkpoints_damaged_stops_with_a_clear_error(reference, tmp_path):
    run = interrupted_copy(reference, tmp_path)
    flip(largest_shard(rundir.step_dir(run, 8)))
    truncate(largest_shard(rundir.step_dir(run, 4)))
    metrics = (run / rundir.METRICS).read_text()
    rcs = wait_all(launch(run, world=WORLD))
    assert all(rc not in (0, 75) for rc in rcs), rcs
    log = (run / "rank0.log").read_text()
    assert "CheckpointError: no intact checkpoint" in log and "refusing to train from step 0" in log
    assert [s for s, _ in rejections(run)] == [8, 4]
    assert rundir.read_events(run)[-1]["event"] == "no_intact_checkpoint"
    assert rundir.checkpoint_steps(run)[0] == []  # both renamed step-N.corrupt
    assert (run / rundir.METRICS).read_text() == metrics  # not a step trained
    # The next start (a requeue) refuses too instead of seeing "no checkpoint" and starting over.
    assert wait_all(launch(run, world=1)) not in ([0], [75])
    assert (run / "rank0.log").read_text().count("refusing to train from step 0") == 2
    assert (run / rundir.METRICS).read_text() == metrics
    assert not rundir.step_dir(run, STEPS).exists() and not rundir.is_finished(run)


def test_checkpoints_without_manifest_still_load(reference, tmp_path):
    """Written by an older version: no manifest, numpy arrays in the RNG files. A load error (the
    truncated shard of step 8) still falls back; step 4 resumes exactly."""
    run = interrupted_copy(reference, tmp_path)
    for step in (4, 8):
        (rundir.step_dir(run, step) / rundir.MANIFEST).unlink()
        for f in rundir.step_dir(run, step).glob("rng-rank*.pt"):
            state = torch.load(f, weights_only=True)
            name, key, *rest = state["numpy"]
            state["numpy"] = (name, key.numpy().astype(np.uint32), *rest)  # the old layout
            torch.save(state, f)
    truncate(largest_shard(rundir.step_dir(run, 8)))
    assert wait_all(launch(run, world=WORLD)) == [0] * WORLD
    log = (run / "rank0.log").read_text()
    assert log.count(f"has no {rundir.MANIFEST}") == 1  # warned once
    assert "step-00000008 rejected: model/optimizer shards (torch engine): " in log
    assert f"resumed from {rundir.step_dir(run, 4)} " in log
    assert train_losses(run) == train_losses(reference)
    assert_bitwise_equal(weights(run, tmp_path), weights(reference, tmp_path))


def test_rng_state_round_trips_bit_exactly_without_unpickling_objects(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # python and numpy both keep the second Gaussian of a pair in their state
    np.random.standard_normal()
    f = tmp_path / "rng.pt"
    torch.save(_rng_state(), f)
    expected = (
        random.random(),
        random.gauss(0, 1),
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist(),
    )
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    _set_rng_state(_load_rng(f))
    assert (
        random.random(),
        random.gauss(0, 1),
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist(),
    ) == expected


def test_large_files_are_checksummed_in_blocks_and_a_flipped_byte_names_its_block(
    tmp_path, monkeypatch
):
    """DCP writes one large file per rank: above _CRC_BLOCK it is hashed in blocks, in parallel.
    Real files, the block shrunk to 1 MiB; old whole-file entries still verify."""
    import json as _json
    import os as _os

    from bionemo import checkpoint

    monkeypatch.setattr(checkpoint, "_CRC_BLOCK", 1 << 20)
    folder = tmp_path / "run" / rundir.CHECKPOINTS / "step-00000001"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(_os.urandom((3 << 20) + 12345))
    (folder / ".metadata").write_bytes(b"small")
    names = ["__0_0.distcp", ".metadata"]
    entries = checkpoint._checksums(folder, names)
    big = entries["__0_0.distcp"]
    assert big["block"] == 1 << 20 and len(big["crc32"]) == 4  # 3 MiB + a tail
    assert isinstance(entries[".metadata"]["crc32"], str)
    manifest = folder / rundir.MANIFEST
    manifest.write_text(_json.dumps({"checksum": "crc32", "files": entries}))
    ckpt = checkpoint.Checkpointer(tmp_path / "run", keep_last=1, rank=0)
    assert ckpt._verify(folder) is None

    with open(folder / "__0_0.distcp", "r+b") as f:  # one flipped byte in the third block
        f.seek((2 << 20) + 7)
        byte = f.read(1)
        f.seek((2 << 20) + 7)
        f.write(bytes([byte[0] ^ 0x01]))
    name, reason = ckpt._verify(folder)
    assert name == "__0_0.distcp" and reason.startswith("crc32 ")
    assert f"of bytes {2 << 20}-{3 << 20}" in reason, reason

    # a manifest written before blocks (one crc32 for the whole file) still verifies
    whole = checkpoint._checksums(folder, names, {n: None for n in names})
    manifest.write_text(_json.dumps({"checksum": "crc32", "files": whole}))
    assert isinstance(whole["__0_0.distcp"]["crc32"], str) and ckpt._verify(folder) is None
    # a manifest whose block list does not cover the file is refused as unreadable
    bad = dict(entries, **{"__0_0.distcp": dict(big, crc32=big["crc32"][:2])})
    manifest.write_text(_json.dumps({"checksum": "crc32", "files": bad}))
    name, reason = ckpt._verify(folder)
    assert name == rundir.MANIFEST and "2 block checksums" in reason, reason


def test_checksums_made_while_the_engine_is_built_verify_the_checkpoint(tmp_path, caplog):
    """prefetch() checksums the newest checkpoint in a thread (the trainer starts it before it
    builds the engine); resume's verification uses them: damage made before is caught the same
    way, and a manifest that changed in between is verified anew."""
    import json as _json
    import logging
    import os as _os

    from bionemo import checkpoint

    folder = tmp_path / "run" / rundir.CHECKPOINTS / "step-00000001"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(_os.urandom(1 << 20))
    (folder / ".metadata").write_bytes(b"small")
    manifest = folder / rundir.MANIFEST
    entries = checkpoint._checksums(folder, ["__0_0.distcp", ".metadata"])
    manifest.write_text(_json.dumps({"checksum": "crc32", "files": entries}))
    ckpt = checkpoint.Checkpointer(tmp_path / "run", keep_last=1, rank=0)

    with caplog.at_level(logging.INFO, logger=checkpoint.__name__):
        ckpt.prefetch(folder)
        assert ckpt._verify(folder) is None
    assert "step-00000001 with the checksums made while the engine was built" in caplog.text

    flip(folder / "__0_0.distcp")
    ckpt.prefetch(folder)
    name, reason = ckpt._verify(folder)
    assert name == "__0_0.distcp" and reason.startswith("crc32 "), reason

    # the manifest rewritten after prefetch() (here: to match the damage): verified anew
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=checkpoint.__name__):
        ckpt.prefetch(folder)
        ckpt._prefetched[1].result()
        fixed = checkpoint._checksums(folder, ["__0_0.distcp", ".metadata"])
        manifest.write_text(_json.dumps({"checksum": "crc32", "files": fixed}))
        assert ckpt._verify(folder) is None
    assert "made while the engine was built" not in caplog.text
