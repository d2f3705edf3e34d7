"""Atomic, resumable checkpoints; the engine writes the model and optimizer shards.

A save writes into `step-N.partial/`: model and optimizer through the engine (the torch engine:
DCP; the megatron engine: dist_checkpointing; each rank its shards),
each rank its RNG states, rank 0 the trainer state (step and consumed samples; the learning-rate
schedule is a pure function of the step, so the step is its whole state). After a barrier (every
rank finished writing) rank 0 writes the COMPLETE marker, fsyncs, and renames the folder to
`step-N/`. A process killed at any point leaves either no `step-N/` or a complete one,
so a start never resumes from a half-written save (BioNeMo's recipes could).

Before the marker, the ranks checksum every file in the folder (each rank a share) and rank 0
writes `manifest.json`: whichever engine wrote the shards, bytes that rot, get truncated or
overwritten later are caught at load time. Resuming verifies the newest complete checkpoint the
same way (each rank a share, one verdict for all ranks), loads it, and on a mismatch, a missing
file or a load error renames it `step-N.corrupt`, records a `checkpoint_rejected` event and tries
the next older one; with none left it stops with CheckpointError rather than start from step 0.

RNG states are tensors, lists and numbers, read with `torch.load(weights_only=True)`: loading a
checkpoint never runs code from an RNG file. (DCP's `.metadata` is still a pickle: checkpoint
folders must come from a trusted source; see docs/design.md.)
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import threading
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from bionemo import rundir
from bionemo.savefail import WRITE_ERRORS, agree_written, one_line

log = logging.getLogger(__name__)
# A single process saves and loads without a process group on purpose; DCP warns about it each time.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)

TRAINER_STATE = "trainer_state.json"
# Tests set this to a step number: the process SIGKILLs itself after writing that step's data but
# before the checkpoint is committed, which is the worst moment for a real node failure.
KILL_DURING_SAVE = "BIONEMO_KILL_DURING_SAVE"
REJECTED_SUFFIX = (
    ".corrupt"  # a rejected step-N folder is renamed step-N.corrupt: never tried again
)
# Not in the manifest: the marker is written after it; the manifest cannot hold its own checksum.
_UNLISTED = (rundir.COMPLETE, rundir.MANIFEST)


class CheckpointError(RuntimeError):
    """Checkpoints exist but none is intact: the run stops instead of training from step 0."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken
    consumed_samples: int = 0  # global sample position of the data stream
    world_size: int = 1
    wandb_id: str | None = None
    engine: str = "torch"  # which engine wrote the model/optimizer state
    tensor_parallel: int = 1
    pipeline_parallel: int = 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    """Every RNG state as tensors, tuples and numbers only: what torch.load(weights_only=True) reads
    without an allowlist (numpy's key array becomes an int64 tensor; uint32 fits exactly)."""
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),  # (version, 625 ints, gauss_next float or None)
        "numpy": (
            name,
            torch.from_numpy(key.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]  # key: a tensor, or an ndarray (older files)
    np.random.set_state((name, np.asarray(key).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_payload(engine) -> dict:
    """What rng-rank*.pt holds. An engine state that weights_only cannot read back (a
    torch.Generator, say) fails here, at the first save, not as a "damaged" file at every resume."""
    payload = {**_rng_state(), "engine": engine.rng_state()}

    def check(x, where):
        if isinstance(x, dict):
            for k, v in x.items():
                check(v, f"{where}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                check(v, f"{where}[{i}]")
        elif not isinstance(x, (torch.Tensor, str, int, float, bool, type(None))):
            raise TypeError(
                f"RNG state {where} is a {type(x).__name__}; RNG files hold tensors, "
                f"numbers, strings, lists, tuples and dicts only (weights_only load)"
            )

    check(payload, "rng")
    return payload


# Files written before the manifest existed hold numpy's key as an ndarray. These four rebuild a
# plain array and nothing else; any other global (os.system, builtins.open, ...) is still refused.
_LEGACY_RNG_TYPES = [
    np.ndarray((0,)).__reduce__()[0],  # numpy's _reconstruct (module moved in 2.0)
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def _load_rng(path: Path) -> dict:
    with torch.serialization.safe_globals(_LEGACY_RNG_TYPES):
        return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------ manifest
# zlib.crc32: the fastest checksum in the standard library here (3.5 GB/s on one core of this
# project's CI VM, blake2b 0.8, sha256 1.6; benchmarks/results/checkpoint_manifest.md), and both it
# and file reads release the GIL, so threads overlap. It catches every burst error of up to 32
# bits and misses random damage with probability 2**-32. It is no defence against deliberate
# tampering, which a checkpoint folder must not be exposed to anyway (DCP's .metadata is a pickle).
_READ_BLOCK = 8 << 20
_HASH_THREADS = 4
# A file larger than this is checksummed in blocks of this size, the blocks in parallel: DCP
# writes one file per rank (7.8 GB for a 650M on one GPU, 34 GB for a 3B), which one thread
# hashed at 1-2.4 GB/s on every save's commit and every resume. The manifest then holds the
# block size and one crc32 per block.
_CRC_BLOCK = 256 << 20


def _crc_range(path: Path, start: int, length: int) -> int:
    crc, left, buf = 0, length, bytearray(min(_READ_BLOCK, max(length, 1)))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while left and (n := f.readinto(view[: min(len(buf), left)])):
            crc = zlib.crc32(view[:n], crc)
            left -= n
    return crc


def _files(folder: Path) -> dict[str, int]:
    """Every file under the folder (relative name -> size), whichever engine wrote it."""
    out = {}
    for f in sorted(folder.rglob("*")):
        name = f.relative_to(folder).as_posix()
        if f.is_file() and name not in _UNLISTED:
            out[name] = f.stat().st_size
    return out


def balanced_share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's names (files to checksum, parameters to stage): largest first, each to the rank
    with the fewest bytes so far, so the ranks handle about equal amounts (the same answer on every
    rank: the input is the same)."""
    load, mine = [0] * world, []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = load.index(min(load))
        load[r] += max(sizes[name], 1)
        if r == rank:
            mine.append(name)
    return mine


def _checksums(
    folder: Path, names: list[str], blocks: dict[str, int | None] | None = None
) -> dict[str, dict]:
    """name -> {"size", "crc32"}: one crc32 string for the whole file, or, for a file larger
    than _CRC_BLOCK, {"size", "block", "crc32": [one per block]}. blocks: the layout to
    reproduce (a manifest's: name -> its block size, None for a whole-file crc32)."""
    if not names:
        return {}
    tasks: list[tuple[str, int, int]] = []  # (name, start, length): hashed in parallel
    layout = {}
    for name in names:
        size = (folder / name).stat().st_size
        block = blocks.get(name) if blocks is not None else None
        if blocks is None and size > _CRC_BLOCK:
            block = _CRC_BLOCK
        layout[name] = (size, block)
        if block:
            tasks += [(name, start, min(block, size - start)) for start in range(0, size, block)]
        else:
            tasks.append((name, 0, size))
    with ThreadPoolExecutor(min(_HASH_THREADS, len(tasks))) as pool:
        crcs = list(pool.map(lambda t: _crc_range(folder / t[0], t[1], t[2]), tasks))
    out: dict[str, dict] = {}
    for (name, _, _), crc in zip(tasks, crcs):
        size, block = layout[name]
        if block:
            entry = out.setdefault(name, {"size": size, "block": block, "crc32": []})
            entry["crc32"].append(f"{crc:08x}")
        else:
            out[name] = {"size": size, "crc32": f"{crc:08x}"}
    for name, (size, block) in layout.items():  # an empty file in blocks: no block at all
        out.setdefault(name, {"size": size, "block": block, "crc32": []})
    return out


def _mismatch(got: dict, want: dict) -> str | None:
    """Why a file's checksums differ from its manifest entry (same layout), or None."""
    if got["size"] != want["size"]:
        return f"{got['size']} bytes, the manifest says {want['size']}"
    if isinstance(want["crc32"], str):
        if got["crc32"] != want["crc32"]:
            return f"crc32 {got['crc32']}, the manifest says {want['crc32']}"
        return None
    block = int(want["block"])
    for i, (a, b) in enumerate(zip(got["crc32"], want["crc32"])):
        if a != b:
            end = min((i + 1) * block, got["size"])
            return f"crc32 {a} of bytes {i * block}-{end}, the manifest says {b}"
    return None


def _own_files(folder: Path, rank: int) -> dict[str, dict]:
    """The files a rank wrote in a save (DCP's __<rank>_<n>.distcp, its RNG states; rank 0 also
    .metadata and the trainer state), checksummed and fsynced. Another engine's names are simply
    not found here: the commit checksums whatever no rank claimed."""
    names = [f"rng-rank{rank:05d}.pt"] + [p.name for p in folder.glob(f"__{rank}_*.distcp")]
    if rank == 0:
        names += [".metadata", TRAINER_STATE]
    names = [n for n in names if (folder / n).is_file()]
    sums = _checksums(folder, names)
    for name in names:
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return sums


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(obj):
    """Rank 0's `obj` on every rank."""
    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if _world()[1] == 1:
        return [obj]
    out = [None] * _world()[1]
    dist.all_gather_object(out, obj)
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, rank: int):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / rundir.CHECKPOINTS
        self.keep_last = keep_last
        self.rank = rank
        self._warned_unverified = False  # checkpoints without a manifest: warn once
        self._pending = None  # an asynchronous save in flight: (future, tmp, final, step, error)
        self._groups = None  # CPU groups for asynchronous saves (made at the first, all ranks)
        self._prefetched = None  # (path, future of (manifest files, this rank's checksums, s))

    # ---------------------------------------------------------------- save
    def save(self, engine, state: TrainerState, asynchronous: bool = False) -> Path | None:
        """Save `state` and the engine's shards as step-N. Synchronous: committed on return.
        asynchronous (the torch engine): the shards are copied to host memory and written by a
        background thread while training goes on; the folder is committed by poll() once every
        rank's write finished (or by the next save or finish()), and None is returned."""
        self.finish()  # an earlier asynchronous save commits first
        final = rundir.step_dir(self.run_dir, state.step)
        tmp = final.with_name(final.name + ".partial")
        if self.rank == 0:
            if final.exists():  # the same step saved before (e.g. stop right after a periodic save)
                shutil.rmtree(final)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        asynchronous = asynchronous and getattr(engine, "supports_async_save", False)
        error, pending = None, None
        try:  # a write error (a full disk) must reach every rank, or the others hang below
            if asynchronous:
                pending = engine.save(tmp, self._async_group(), asynchronous=True)
            else:
                engine.save(tmp)
            torch.save(_rng_payload(engine), tmp / f"rng-rank{self.rank:05d}.pt")
            if self.rank == 0:
                (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1))
        except WRITE_ERRORS as e:
            error = e
        if os.environ.get(KILL_DURING_SAVE) == str(state.step):  # fault injection for tests
            os.kill(os.getpid(), signal.SIGKILL)  # (asynchronous: while the shards are written)
        if pending is not None:
            self._pending = (self._after_write(pending, tmp), tmp, final, state.step, error)
            return None
        return self._commit(tmp, final, state.step, error)

    def _after_write(self, written, tmp: Path) -> Future:
        """A future for the background write plus this rank's share of the commit: once its
        files are written, the writer's thread checksums and fsyncs them (the bulk of a commit:
        ~5 s for a 650M's 7.8 GB on an H200 machine when the training loop did it). The commit
        then only gathers these and checks what no rank claimed."""
        prepared: Future = Future()

        def done(future) -> None:
            try:
                future.result()
                prepared.set_result(_own_files(tmp, self.rank))
            except BaseException as e:  # the write's error (or a checksum's), for finish()
                prepared.set_exception(e)

        written.add_done_callback(done)
        return prepared

    @property
    def pending(self) -> bool:
        """An asynchronous save is in flight (not yet committed)."""
        return self._pending is not None

    def poll(self) -> Path | None:
        """Once per step while an asynchronous save is in flight: commit it when every rank's
        write has finished (one small all-reduce over the CPU group); else return None."""
        if self._pending is None:
            return None
        done = torch.tensor([1 if self._pending[0].done() else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._async_group("poll"))
        return self.finish() if done.item() else None

    def finish(self) -> Path | None:
        """Wait for the asynchronous save in flight, if any, and commit it."""
        if self._pending is None:
            return None
        future, tmp, final, step, error = self._pending
        self._pending = None
        known = None
        try:
            known = future.result()  # this rank's files, checksummed and fsynced
        except WRITE_ERRORS as e:  # DCP's CheckpointException carries each rank's error
            error = error or e
        return self._commit(tmp, final, step, error, known)

    def _async_group(self, role: str = "writer"):
        """Two CPU (gloo) groups of their own, made by every rank at the first asynchronous save:
        the background writer's collectives and poll()'s all-reduce run in different threads,
        and two threads must never drive collectives on one group (nor on the training's)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if self._groups is None:
            self._groups = {
                "writer": dist.new_group(backend="gloo"),
                "poll": dist.new_group(backend="gloo"),
            }
        return self._groups[role]

    def _commit(self, tmp: Path, final: Path, step: int, error, known=None) -> Path:
        """known: this rank's files already checksummed and fsynced (asynchronous saves)."""
        agree_written(error, tmp, step, self.rank)  # any rank failed: SaveFailed on every rank
        _barrier()  # every rank has finished writing its part
        synced = self._write_manifest(tmp, step, known)
        if self.rank == 0:
            marker = tmp / rundir.COMPLETE
            marker.write_text(f"{step}\n")
            for f in tmp.iterdir():  # make the bytes durable before the folder becomes visible
                if f.name in synced:
                    continue
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        _barrier()
        return final

    def _write_manifest(self, folder: Path, step: int, known: dict | None = None) -> set[str]:
        """Every rank checksums a share of the folder's files; rank 0 writes the manifest.
        known: this rank's checksums made after a background write. Returns the names whose
        checksum came from `known` (their writers fsynced them)."""
        rank, world = _world()
        sizes = _from_rank0(_files(folder) if rank == 0 else None)
        # Files a rank checksummed (and fsynced) after writing them count if their size still
        # matches; the rest are shared out and checksummed now.
        covered = {}
        if known is not None:
            for part in _gathered(known):
                for name, entry in part.items():
                    if sizes.get(name) == entry["size"]:
                        covered[name] = entry
        rest = {name: size for name, size in sizes.items() if name not in covered}
        parts = _gathered(_checksums(folder, balanced_share(rest, rank, world)))
        if known is not None and rank == 0:
            log.info(
                "manifest of %s: %d of %d files checksummed after their background write",
                folder.name,
                len(covered),
                len(sizes),
            )
        error = None
        if rank == 0:
            files = dict(covered)
            files.update({name: entry for part in parts for name, entry in part.items()})
            try:
                (folder / rundir.MANIFEST).write_text(
                    json.dumps(
                        {"checksum": "crc32", "files": dict(sorted(files.items()))}, indent=1
                    )
                )
            except WRITE_ERRORS as e:
                error = e
        agree_written(error, folder, step, rank)  # a full disk here too: SaveFailed on every rank
        return set(covered)

    def _prune(self) -> None:
        steps, incomplete = rundir.checkpoint_steps(self.run_dir)
        for step in steps[: -self.keep_last]:
            shutil.rmtree(rundir.step_dir(self.run_dir, step), ignore_errors=True)
        for d in incomplete:
            shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def latest(self) -> Path | None:
        """The newest complete checkpoint (not yet verified: resume() does that), or None for a
        new run. Raises CheckpointError when every checkpoint was rejected by an earlier start."""
        steps, incomplete = rundir.checkpoint_steps(self.run_dir)
        rejected = [d for d in incomplete if d.name.endswith(REJECTED_SUFFIX)]
        if self.rank == 0:
            for d in incomplete:
                why = (
                    "rejected as corrupt by an earlier start"
                    if d in rejected
                    else "its save never finished"
                )
                log.warning("ignoring incomplete checkpoint %s (%s)", d, why)
        if not steps and rejected:
            names = sorted(d.name for d in rejected)
            if self.rank == 0:
                rundir.append_event(self.run_dir, "no_intact_checkpoint", rejected=names)
            raise CheckpointError(self._no_intact_message(names))
        return rundir.step_dir(self.run_dir, steps[-1]) if steps else None

    def _no_intact_message(self, rejected: list[str]) -> str:
        return (
            f"no intact checkpoint in {self.root}: every complete checkpoint was rejected "
            f"({', '.join(rejected)}; the reasons are in the log and in "
            f"{self.run_dir / rundir.EVENTS}); refusing to train from step 0. Restore a "
            f"checkpoint folder from a copy, or delete the *{REJECTED_SUFFIX} folders to "
            f"start this run over"
        )

    def resume(self, engine) -> tuple[Path, TrainerState]:
        """Load the newest intact complete checkpoint: verify it against its manifest, load it,
        and on any failure reject it and try the next older one. Every rank takes the same path
        (rank 0's listing, verdicts gathered from all ranks)."""
        steps = _from_rank0(rundir.checkpoint_steps(self.run_dir)[0] if self.rank == 0 else None)
        rejected = []
        for step in reversed(steps):
            path = rundir.step_dir(self.run_dir, step)
            problem = self._verify(path)
            if problem is None:
                state, problem = self._load_agreed(path, engine)
                if problem is None:
                    return path, state
            self._reject(path, step, *problem)
            rejected.append(path.name)
        if self.rank == 0:
            rundir.append_event(self.run_dir, "no_intact_checkpoint", rejected=rejected)
        raise CheckpointError(self._no_intact_message(rejected))

    def prefetch(self, path: Path) -> None:
        """Start checksumming this rank's share of `path`, the checkpoint resume() tries first,
        in a thread of its own, so that verifying it overlaps building the engine (on one H200
        a 650M's restart spent 6.5 s building and 12 s loading and verifying). No collective
        here: every rank reads the manifest itself; resume() uses these checksums only when the
        manifest it agreed on is the one read here."""
        rank, world = _world()
        future: Future = Future()

        def run() -> None:
            start = time.monotonic()
            try:
                files = json.loads((path / rundir.MANIFEST).read_text())["files"]
                mine = balanced_share(
                    {name: int(e["size"]) for name, e in files.items()}, rank, world
                )
                sums = _checksums(path, mine, {name: files[name].get("block") for name in mine})
            except Exception:  # noqa: BLE001 -- resume() verifies again and names the problem
                future.set_result(None)
                return
            future.set_result((files, sums, time.monotonic() - start))

        threading.Thread(target=run, name="checkpoint-verify", daemon=True).start()
        self._prefetched = (path, future)

    def _prefetched_sums(self, path: Path, files: dict, mine: list[str]) -> dict | None:
        """prefetch()'s checksums of `path`, when they were made for this manifest and share."""
        if self._prefetched is None or self._prefetched[0] != path:
            return None
        found, self._prefetched = self._prefetched[1].result(), None
        if found is None or found[0] != files or sorted(found[1]) != sorted(mine):
            return None
        if self.rank == 0:
            log.info(
                "verified %s with the checksums made while the engine was built (%.1f s)",
                path.name,
                found[2],
            )
        return found[1]

    def _verify(self, path: Path) -> tuple[str, str] | None:
        """(file, reason) of the first problem, the same on every rank, or None when every file
        matches its manifest entry. Checkpoints written before manifests pass (warned once)."""
        plan = _from_rank0(self._manifest_plan(path) if self.rank == 0 else None)
        if "problem" in plan:
            return plan["problem"]
        if "files" not in plan:
            if self.rank == 0 and not self._warned_unverified:
                log.warning(
                    "%s has no %s (written by an older version): loading it unverified",
                    path,
                    rundir.MANIFEST,
                )
                self._warned_unverified = True
            return None
        files = plan["files"]
        rank, world = _world()
        mine = balanced_share({name: e["size"] for name, e in files.items()}, rank, world)
        found = []
        sums = self._prefetched_sums(path, files, mine)
        try:
            if sums is None:
                sums = _checksums(path, mine, {name: files[name].get("block") for name in mine})
        except OSError as e:
            found.append((Path(e.filename or "?").name, f"unreadable: {e.strerror or e}"))
            sums = {}
        for name, got in sums.items():
            reason = _mismatch(got, files[name])
            if reason:
                found.append((name, reason))
        problems = sorted(p for part in _gathered(found) for p in part)
        return problems[0] if problems else None

    @staticmethod
    def _manifest_plan(path: Path) -> dict:
        """Rank 0: {"files": manifest entries}, {"problem": (file, reason)} or {} (no manifest)."""
        try:
            files = json.loads((path / rundir.MANIFEST).read_text())["files"]
            for entry in files.values():  # every rank indexes these: a bad entry fails here
                size, crc = int(entry["size"]), entry["crc32"]
                if isinstance(crc, list):  # one per block of entry["block"] bytes
                    block = int(entry["block"])
                    if block <= 0 or len(crc) != -(-size // block):
                        raise ValueError(f"{len(crc)} block checksums for {size} bytes")
                    [int(c, 16) for c in crc]
                else:
                    int(crc, 16)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return {"problem": (rundir.MANIFEST, f"unreadable: {type(e).__name__}: {e}")}
        present = _files(path)
        for name in sorted(files):
            if name not in present:
                return {"problem": (name, "missing")}
        for name in sorted(present):
            if name not in files:
                return {"problem": (name, "not in the manifest (added after the save)")}
        return {"files": files}

    def _load_agreed(
        self, path: Path, engine
    ) -> tuple[TrainerState | None, tuple[str, str] | None]:
        """load() on every rank; one rank's failure is every rank's failure. A run that uses the
        other engine and running out of memory are not damage: those propagate. (DCP reports a
        read error on every rank; an engine whose load raised on one rank only inside its own
        collectives could still hang: the manifest check before catches damage first.)"""
        problem = None
        try:
            state = self.load(path, engine)
        except _Damaged as e:
            state, problem = None, (e.file, e.reason)
        problems = sorted(p for p in _gathered(problem) if p)
        return state, (tuple(problems[0]) if problems else None)

    def _reject(self, path: Path, step: int, file: str, reason: str) -> None:
        if self.rank != 0:
            return
        target = path.with_name(path.name + REJECTED_SUFFIX)
        log.error(
            "checkpoint %s rejected: %s: %s; renaming it %s and trying the next older one",
            path,
            file,
            reason,
            target.name,
        )
        rundir.append_event(
            self.run_dir, "checkpoint_rejected", step=step, file=file, reason=reason, path=str(path)
        )
        try:
            shutil.rmtree(target, ignore_errors=True)
            os.rename(path, target)
        except OSError as e:  # e.g. a read-only copy: the next start verifies and rejects it again
            log.error("could not rename %s: %s", path, e)

    def load(self, path: Path, engine) -> TrainerState:
        """One checkpoint folder into the engine and this process's RNGs. Raises EngineMismatch
        (the run's configuration is wrong) or _Damaged (this folder is), nothing else."""
        with _blame(TRAINER_STATE):
            state = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
        if state.engine != engine.name:
            raise EngineMismatch(
                f"{path} was written by the {state.engine} engine and this run uses the "
                f"{engine.name} engine (train.engine); keep train.engine={state.engine}, or start a "
                f"new run with checkpoint.init_from={path} (weights only)"
            )
        with _blame(f"model/optimizer shards ({engine.name} engine)"):
            engine.load(path)
        rng_file = path / f"rng-rank{self.rank:05d}.pt"
        # Another TP/PP layout reshards model and optimizer; RNG states are per rank of a layout.
        same_layout = (state.tensor_parallel, state.pipeline_parallel) == (engine.tp, engine.pp)
        if rng_file.is_file() and same_layout:
            with _blame(rng_file.name):
                rng = _load_rng(rng_file)
                _set_rng_state(rng)
                engine.set_rng_state(rng.get("engine", {}))
        else:  # resumed at a larger world size or another TP/PP layout: no RNG state for this
            # rank; the data stream is keyed by global sample index, so only non-data randomness
            # (dropout) is reseeded here.
            log.warning("no RNG state for rank %d in %s; reseeding", self.rank, path)
        return state


class EngineMismatch(ValueError):
    """The checkpoint is fine; the run is configured for the other engine."""


class _Damaged(Exception):
    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


@contextmanager
def _blame(file: str):
    """Any error inside the block but running out of memory becomes _Damaged, naming `file`."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        # A refused pickle's message ends with a link; the line naming the refused global says more.
        refused = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        reason = f"{type(e).__name__}: {refused[0]}" if refused else one_line(e)
        raise _Damaged(file, reason[:300]) from e


def load_weights(path: Path, model) -> None:
    """Weights only (fine-tuning start, conversion): no optimizer, no trainer state."""
    path = Path(path)
    if not (path / rundir.COMPLETE).is_file():
        raise ValueError(
            f"checkpoint.init_from: {path} is not a complete checkpoint folder (no "
            f"{rundir.COMPLETE} marker); point it at a runs/.../checkpoints/step-N folder"
        )
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=path)
    set_model_state_dict(model, sd, options=StateDictOptions(strict=True))
