"""Weights between the engines' checkpoints.

    python -m bionemo.engines.convert MEGATRON_STEP_DIR OUT_DIR [--config RUN/config.yaml]

reads the model weights of a megatron-engine checkpoint (any tensor/pipeline layout: megatron's
dist_checkpointing reassembles the shards) and writes a torch-engine weights-only checkpoint
folder (complete, usable as `checkpoint.init_from` and by `bionemo.models.esm2.convert` for
Hugging Face). The other direction needs no tool: the megatron engine takes a torch-engine
checkpoint as `checkpoint.init_from` and converts while loading. Runs on CPU, one process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def megatron_state_to_torch(ckpt: Path, model_cfg) -> dict:
    """Full torch-engine state dict from a megatron-engine checkpoint (this process alone)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from bionemo.models.esm2 import megatron as esm2_megatron

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    try:
        ps.initialize_model_parallel(1, 1)
        # bf16 parameters, as the engine saves them (the checkpoint's dtype), on the host
        tconfig = esm2_megatron.transformer_config(model_cfg, tp=1, pp=1, bf16=True, cpu_init=True)
        model = esm2_megatron.MegatronESM2(model_cfg, tconfig, use_te=False)
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
        esm2_megatron.load_model_state(model, state["model"])
        sd = esm2_megatron.megatron_to_torch(model.state_dict(), model_cfg)
        return {k: v.float() for k, v in sd.items()}  # the torch engine keeps fp32 weights
    finally:
        ps.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def write_torch_checkpoint(sd: dict, out: Path, step: int = 0) -> None:
    """A weights-only torch-engine checkpoint folder, committed with its COMPLETE marker."""
    import torch.distributed.checkpoint as dcp

    from bionemo import rundir

    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output folder (nothing was written)")
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True)
    dcp.save({"model": {k: v.contiguous() for k, v in sd.items()}}, checkpoint_id=tmp, no_dist=True)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "engine": "torch"}))
    (tmp / rundir.COMPLETE).write_text(f"{step}\n")
    os.rename(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="a megatron-engine runs/.../checkpoints/step-N")
    p.add_argument("out", type=Path, help="new folder for the torch-engine checkpoint")
    p.add_argument(
        "--config",
        type=Path,
        help="the run's config.yaml (default: the run directory above the checkpoint)",
    )
    args = p.parse_args(argv)
    from bionemo import rundir
    from bionemo.config import load_trainer_config
    from bionemo.engines import checkpoint_engine

    if not (args.checkpoint / rundir.COMPLETE).is_file():
        print(f"error: {args.checkpoint} is not a complete checkpoint folder", file=sys.stderr)
        return 2
    if checkpoint_engine(args.checkpoint) != "megatron":
        print(f"error: {args.checkpoint} is a torch-engine checkpoint already", file=sys.stderr)
        return 2
    config = args.config or args.checkpoint.parents[1] / rundir.CONFIG
    cfg = load_trainer_config(config)
    state = json.loads((args.checkpoint / "trainer_state.json").read_text())
    write_torch_checkpoint(
        megatron_state_to_torch(args.checkpoint, cfg.model), args.out, state.get("step", 0)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
