"""`python -m bionemo.train RUN_DIR` with wall-clock stamps of its start-up phases (issue 15's
restart cost): each phase ends with a `[timing] <unix time> <phase>` line on stderr, which srun
writes to the run's train log. The trainer is unchanged: the stamps wrap its module-level names
(pick_device, build_engine, Checkpointer.load, dataloader_builder) for this process only.

Started by timed_python.sh as `timed_train.py -m bionemo.train RUN_DIR`.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, as `-m` would


def stamp(phase: str) -> None:
    print(f"[timing] {time.time():.3f} {phase}", file=sys.stderr, flush=True)


def _after(owner, name: str, phase: str, sync) -> None:
    """Stamp `phase` when owner.name returns (after the GPU's queued work is done)."""
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        out = inner(*args, **kwargs)
        sync()
        stamp(phase)
        return out

    setattr(owner, name, timed)


def main() -> int:
    stamp("interpreter up")
    if sys.argv[1:3] != ["-m", "bionemo.train"] or len(sys.argv) != 4:
        print("usage: timed_train.py -m bionemo.train RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(sys.argv[3])
    # As bionemo.train.main: allocator setting, then the signal handlers before torch's import.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from bionemo.config import load_trainer_config
    from bionemo.stop import StopFlag

    stop = StopFlag(load_trainer_config(run_dir / "config.yaml").train.stop_signal)
    import torch

    stamp("torch imported")
    from bionemo import trainer

    stamp("trainer imported")

    def sync():
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()

    _after(trainer, "pick_device", "device ready (CUDA context)", sync)
    _after(torch.distributed, "init_process_group", "rendezvous done", sync)
    _after(trainer.Checkpointer, "load", "checkpoint loaded", sync)
    build_engine = trainer.build_engine

    def timed_engine(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        sync()
        stamp("engine built (model on the device)")
        first = engine.train_step

        def first_step(*a, **kw):
            engine.train_step = first  # later steps untouched
            out = first(*a, **kw)
            sync()
            stamp("first step done")
            return out

        engine.train_step = first_step
        return engine

    trainer.build_engine = timed_engine
    builder = trainer.dataloader_builder

    def timed_builder(family):
        build = builder(family)

        def timed_build(**kwargs):
            loader = build(**kwargs)
            if kwargs.get("split") != "train":
                return loader
            batches = iter(loader)
            first = next(batches)  # samples are pure functions of their index: order is unchanged
            stamp("first batch ready (data start-up)")
            return itertools.chain([first], batches)

        return timed_build

    trainer.dataloader_builder = timed_builder
    return trainer.train(run_dir, stop)


if __name__ == "__main__":
    sys.exit(main())
