"""Probe: load a megatron checkpoint at another layout (one process, TP=PP=1) and check that the
distributed optimizer's fp32 main weights equal the loaded model weights (copying main -> model
must change nothing beyond bf16 rounding)."""

import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.megatron_check import make_run, train, init_checkpoint  # noqa: E402
from benchmarks.sweep import free_port  # noqa: E402
from bionemo import rundir  # noqa: E402
from bionemo.config import TrainerConfig  # noqa: E402
from bionemo.distributed.env import DistEnv  # noqa: E402


def probe(run: Path, step: int):
    import torch.distributed as dist
    from bionemo.engines.megatron_engine import MegatronEngine

    raw = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    raw["parallel"]["tensor"] = 1
    raw["parallel"]["pipeline"] = 1
    cfg = TrainerConfig.model_validate(raw)
    env = DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr="127.0.0.1",
        master_port=free_port(),
        stop_signal="USR2",
    )
    engine = MegatronEngine(cfg, env, torch.device("cuda", 0), None)
    engine.load(rundir.step_dir(run, step))
    before = {n: p.detach().float().clone() for n, p in engine.inner.named_parameters()}
    for opt in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        opt._copy_main_params_to_model_params()
    bad = 0
    for n, p in engine.inner.named_parameters():
        d = (p.detach().float() - before[n]).abs().max().item()
        rel = d / (before[n].abs().max().item() + 1e-12)
        flag = "MISMATCH" if rel > 0.02 else "ok"
        bad += flag != "ok"
        print(f"{flag:8s} {n:70s} max|main-model| {d:.3e} rel {rel:.3e}", flush=True)
    print(f"{bad} parameters whose fp32 main weights differ from the loaded model weights")
    dist.destroy_process_group()


if __name__ == "__main__":
    model, key = sys.argv[1], sys.argv[2]  # e.g. esm2_8m pipeline
    root = Path(sys.argv[3])
    init = init_checkpoint(root, model)
    run = make_run(
        root,
        f"probe-{key}2",
        model,
        {
            "train.max_steps": 6,
            "train.micro_batch_size": 4,
            "checkpoint.init_from": str(init),
            "checkpoint.every_steps": 3,
            "train.engine": "megatron",
            f"parallel.{key}": 2,
        },
    )
    train(run, 2)
    probe(run, 3)
