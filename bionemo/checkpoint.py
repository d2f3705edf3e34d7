"""Atomic, resumable checkpoints; the engine writes the model and optimizer shards.

A save writes into `step-N.partial/`: model and optimizer through the engine (the torch engine:
DCP; the megatron engine: dist_checkpointing; each rank its shards),
each rank its RNG states, rank 0 the trainer state (step and consumed samples; the learning-rate
schedule is a pure function of the step, so the step is its whole state). After a barrier (every
rank finished writing) rank 0 writes the COMPLETE marker, fsyncs, and renames the folder to
`step-N/`. A process killed at any point leaves either no `step-N/` or a complete one,
so a start never resumes from a half-written save (BioNeMo's recipes could). Loading takes the
newest complete checkpoint and warns about the rest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from bionemo import rundir

log = logging.getLogger(__name__)
# A single process saves and loads without a process group on purpose; DCP warns about it each time.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

TRAINER_STATE = "trainer_state.json"
# Tests set this to a step number: the process SIGKILLs itself after writing that step's data but
# before the checkpoint is committed, which is the worst moment for a real node failure.
KILL_DURING_SAVE = "BIONEMO_KILL_DURING_SAVE"


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
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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

    # ---------------------------------------------------------------- save
    def save(self, engine, state: TrainerState) -> Path:
        final = rundir.step_dir(self.run_dir, state.step)
        tmp = final.with_name(final.name + ".partial")
        if self.rank == 0:
            if final.exists():  # the same step saved before (e.g. stop right after a periodic save)
                shutil.rmtree(final)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        engine.save(tmp)
        torch.save({**_rng_state(), "engine": engine.rng_state()}, tmp / f"rng-rank{self.rank:05d}.pt")
        if self.rank == 0:
            (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1))
        if os.environ.get(KILL_DURING_SAVE) == str(state.step):  # fault injection for tests
            os.kill(os.getpid(), signal.SIGKILL)
        _barrier()  # every rank has finished writing its part
        if self.rank == 0:
            marker = tmp / rundir.COMPLETE
            marker.write_text(f"{state.step}\n")
            for f in tmp.iterdir():  # make the bytes durable before the folder becomes visible
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        steps, incomplete = rundir.checkpoint_steps(self.run_dir)
        for step in steps[: -self.keep_last]:
            shutil.rmtree(rundir.step_dir(self.run_dir, step), ignore_errors=True)
        for d in incomplete:
            shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def latest(self) -> Path | None:
        steps, incomplete = rundir.checkpoint_steps(self.run_dir)
        if self.rank == 0:
            for d in incomplete:
                log.warning("ignoring incomplete checkpoint %s (its save never finished)", d)
        return rundir.step_dir(self.run_dir, steps[-1]) if steps else None

    def load(self, path: Path, engine) -> TrainerState:
        state = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
        if state.engine != engine.name:
            raise ValueError(
                f"{path} was written by the {state.engine} engine and this run uses the "
                f"{engine.name} engine (train.engine); keep train.engine={state.engine}, or start a "
                f"new run with checkpoint.init_from={path} (weights only)"
            )
        engine.load(path)
        rng_file = path / f"rng-rank{self.rank:05d}.pt"
        # Another TP/PP layout reshards model and optimizer; RNG states are per rank of a layout.
        same_layout = (state.tensor_parallel, state.pipeline_parallel) == (engine.tp, engine.pp)
        if rng_file.is_file() and same_layout:
            rng = torch.load(rng_file, weights_only=False)
            _set_rng_state(rng)
            engine.set_rng_state(rng.get("engine", {}))
        else:  # resumed at a larger world size or another TP/PP layout: no RNG state for this
            # rank; the data stream is keyed by global sample index, so only non-data randomness
            # (dropout) is reseeded here.
            log.warning("no RNG state for rank %d in %s; reseeding", self.rank, path)
        return state


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
