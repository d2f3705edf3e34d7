"""Engines: what differs between training with plain PyTorch and with megatron-core.

The training loop (bionemo.trainer) is one; an engine supplies the rest of a step:

    engine = build_engine(cfg, env, device, init_from)   # model, parallel wrapping, optimizer
    engine.dp_rank, engine.dp_size                       # this rank's data shard
    engine.train_step(micro_batches, lr) -> loss          # forward/backward over the micro
                                                          # batches, clip, optimizer step
    engine.eval_loss(batch) -> loss                       # validation
    engine.save(dir) / engine.load(dir)                   # model + optimizer state of a
                                                          # checkpoint folder (Checkpointer does
                                                          # the atomic commit, RNG, trainer state)
    engine.rng_state() / engine.set_rng_state(d)          # engine-specific RNG (megatron's
                                                          # model-parallel tracker)

train_step returns the loss as a device tensor ready for the loop's logging reduction: summed
over all ranks and divided by the world size it is the step's mean loss.

`torch` (default, CPU and GPU, data parallel) is bionemo.engines.torch_engine; `megatron`
(CUDA only: tensor/pipeline parallel, distributed optimizer, dist_checkpointing) is
bionemo.engines.megatron_engine, imported only when chosen.
"""

from __future__ import annotations

ENGINES = ("torch", "megatron")


def build_engine(cfg, env, device, init_from=None):
    if cfg.train.engine == "megatron":
        from bionemo.engines.megatron_engine import MegatronEngine

        return MegatronEngine(cfg, env, device, init_from)
    from bionemo.engines.torch_engine import TorchEngine

    return TorchEngine(cfg, env, device, init_from)


def checkpoint_engine(path) -> str:
    """Which engine wrote a checkpoint folder: megatron's dist_checkpointing leaves a
    metadata.json beside the tensors; the torch engine's DCP folders have none."""
    from pathlib import Path

    return "megatron" if (Path(path) / "metadata.json").is_file() else "torch"
