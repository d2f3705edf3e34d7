"""The megatron engine on GPUs: agreement with the torch engine, TP=2 vs TP=1, resharded resume,
the stop protocol, and weight conversion. Every run is the real trainer (`python -m bionemo.train`,
one process per GPU, the sweep's launcher); results go to benchmarks/results/megatron/.

    python -m benchmarks.megatron_check parity  [--model esm2_650m] [--steps 50] [--mbs 16]
    python -m benchmarks.megatron_check tp      [--model esm2_650m] [--steps 50] [--mbs 8]   # 2 GPUs
    python -m benchmarks.megatron_check pp      --model esm2_3b [--steps 30] [--mbs 4]     # 2 GPUs; layers % 2 == 0
    python -m benchmarks.megatron_check stop    [--model esm2_650m] [--steps 30]
    python -m benchmarks.megatron_check convert [--model esm2_8m]

parity:  the same initial weights (a torch-engine init checkpoint, `checkpoint.init_from`) train
         50 steps in each engine at TP=1 on one GPU; per-step losses side by side, tokens/s of each.
tp:      megatron TP=2 (2 GPUs) vs TP=1 (1 GPU) from the same weights and data; then the TP=2
         run's checkpoint at half-way resumes at TP=1 and its remaining losses are compared.
pp:      the same with pipeline parallelism (PP=2: two stages of the layers) instead of TP.
stop:    a run gets the warning signal (SIGUSR2) mid-run, saves, exits 75, restarts and finishes;
         its losses after the restart are compared with an uninterrupted run's.
convert: a megatron checkpoint -> torch-engine checkpoint (bionemo.engines.convert) -> the torch
         engine evaluates the same loss as the megatron engine did.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.sweep import (  # noqa: E402
    absolute_data_paths,
    free_port,
    load_preset,
    set_dotted,
)
from bionemo import rundir  # noqa: E402
from launchers.paths import project_commit  # noqa: E402
from bionemo.config import REQUEUE_EXIT_CODE, TrainerConfig, dump_trainer_config  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "megatron"


def make_run(root: Path, name: str, model: str, overrides: dict) -> Path:
    cfg = load_preset(model)
    base = {
        "train.max_steps": 50,
        "train.log_every": 1,
        "train.limit_val_batches": 0,
        "train.device": "cuda",
        "data.pad_to": "max_length",
        "optim.warmup_steps": 10,
        "checkpoint.every_steps": 1000,
        "logging.wandb_project": None,
    }
    for key, value in {**base, **overrides}.items():
        set_dotted(cfg, key, value)
    validated = absolute_data_paths(TrainerConfig.model_validate(cfg))
    run = root / name
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"trainer": dump_trainer_config(validated)}))
    return run


def start(run: Path, gpus: int, first_gpu: int = 0) -> list[subprocess.Popen]:
    """`gpus` ranks on the GPUs first_gpu.. of those this process sees (an outer
    CUDA_VISIBLE_DEVICES is honoured, so two checks can share one machine)."""
    port = free_port()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(first_gpu + gpus)]
    if len(ids) < first_gpu + gpus:
        raise RuntimeError(
            f"{run.name} needs GPUs {first_gpu}..{first_gpu + gpus - 1} of "
            f"CUDA_VISIBLE_DEVICES={visible}"
        )
    procs = []
    for rank in range(gpus):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(gpus),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
            "CUDA_VISIBLE_DEVICES": ",".join(ids[first_gpu : first_gpu + gpus]),
        }
        log = open(run / f"rank{rank}.log", "a")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bionemo.train", str(run)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def wait(procs: list[subprocess.Popen], run: Path, timeout: float = 1500) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if any(c not in (0, REQUEUE_EXIT_CODE) for c in codes):
        tail = (run / "rank0.log").read_text(errors="replace").splitlines()[-60:]
        raise RuntimeError(f"{run}: exit codes {codes}\n" + "\n".join(tail))
    return codes


def train(run: Path, gpus: int = 1) -> list[int]:
    return wait(start(run, gpus), run)


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run)}


def speed(run: Path, skip: int = 10) -> dict:
    rs = [r for r in records(run) if r["step"] > skip]
    return {
        "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s_per_gpu"] for r in rs),
        "tflops_per_gpu": statistics.median(r["tflops_per_gpu"] for r in rs),
        "mfu": statistics.median(r["mfu"] for r in rs) if rs[0].get("mfu") else None,
        "peak_memory_gib": max(r["peak_memory_gib"] for r in rs),
    }


def compare(a: dict[int, float], b: dict[int, float], steps=None) -> dict:
    steps = sorted(set(a) & set(b) if steps is None else steps)
    diffs = [abs(a[s] - b[s]) for s in steps]
    rel = [abs(a[s] - b[s]) / abs(b[s]) for s in steps]
    return {
        "steps": len(steps),
        "max_abs_diff": max(diffs),
        "mean_abs_diff": statistics.mean(diffs),
        "max_rel_diff": max(rel),
        "identical": all(d == 0 for d in diffs),
        "first_last": [
            [steps[0], a[steps[0]], b[steps[0]]],
            [steps[-1], a[steps[-1]], b[steps[-1]]],
        ],
    }


def init_checkpoint(root: Path, model: str) -> Path:
    """Seeded torch-engine initial weights as a complete checkpoint folder."""
    import torch

    from bionemo.config import ModelConfig
    from bionemo.engines.convert import write_torch_checkpoint
    from bionemo.models import build_model

    out = root / f"init-{model}"
    if out.exists():
        return out
    mcfg = ModelConfig.model_validate(load_preset(model)["model"])
    torch.manual_seed(1234)
    with torch.device("cuda"):
        m = build_model(mcfg)
    write_torch_checkpoint({k: v.cpu() for k, v in m.state_dict().items()}, out)
    del m
    torch.cuda.empty_cache()
    return out


def environment() -> dict:
    import torch

    info = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "commit": project_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
    }
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except Exception as e:  # recorded, not fatal for the torch-only parts
        info["megatron_core"] = f"unavailable: {e}"
    info["transformer_engine"] = __import__(
        "bionemo.models.esm2.megatron", fromlist=["x"]
    ).has_transformer_engine()
    return info


# ------------------------------------------------------------------------------------ checks


def check_parity(args, root: Path) -> dict:
    init = init_checkpoint(root, args.model)
    common = {
        "train.max_steps": args.steps,
        "train.micro_batch_size": args.mbs,
        "checkpoint.init_from": str(init),
        "checkpoint.enabled": False,
        "train.precision": args.precision,
    }
    variants = [("torch", "torch", {"train.compile": args.compile}), ("megatron", "megatron", {})]
    if args.compile:
        # The scale of "bf16 tolerance": the same engine and weights with other kernels (eager
        # instead of compiled) differ too, most in the early high-learning-rate transient.
        variants.append(("torch_eager", "torch", {"train.compile": False}))
    runs = {}
    for name, engine, extra in variants:
        run = make_run(
            root, f"parity-{name}", args.model, {**common, **extra, "train.engine": engine}
        )
        train(run)
        runs[name] = run
    ls = {name: losses(run) for name, run in runs.items()}
    lt, lm = ls["torch"], ls["megatron"]
    reference = {}
    if "torch_eager" in ls:
        reference = {
            "torch_compiled_vs_eager": compare(lt, ls["torch_eager"]),
            "megatron_vs_torch_eager": compare(lm, ls["torch_eager"]),
        }
    return {
        "check": "parity",
        "model": args.model,
        "micro_batch_size": args.mbs,
        "steps": args.steps,
        "torch_compile": args.compile,
        "precision": args.precision,
        "loss_agreement": compare(lm, lt),
        **reference,
        "losses": ls,
        "speed": {name: speed(run) for name, run in runs.items()},
    }


def check_tp(args, root: Path) -> dict:
    return check_layout(args, root, "tensor")


def check_pp(args, root: Path) -> dict:
    return check_layout(args, root, "pipeline")


def check_layout(args, root: Path, key: str) -> dict:
    """megatron at parallel.<key>=2 (2 GPUs) vs 1 (1 GPU) from the same weights and data; then the
    size-2 run's half-way checkpoint resumed at size 1."""
    tag = {"tensor": "tp", "pipeline": "pp"}[key]
    init = init_checkpoint(root, args.model)
    half = args.steps // 2
    common = {
        "train.max_steps": args.steps,
        "train.micro_batch_size": args.mbs,
        "checkpoint.init_from": str(init),
        "checkpoint.every_steps": half,
        "train.engine": "megatron",
    }
    two = make_run(root, f"{tag}2", args.model, {**common, f"parallel.{key}": 2})
    one = make_run(root, f"{tag}1", args.model, {**common, f"parallel.{key}": 1})
    if args.gpus >= 3:  # side by side
        p2, p1 = start(two, 2, first_gpu=0), start(one, 1, first_gpu=2)
        wait(p2, two)
        wait(p1, one)
    else:
        train(two, 2)
        train(one, 1)
    # The size-2 checkpoint at half-way, resumed at size 1: a copy of the run directory holding
    # only that checkpoint, with parallel.<key> set to 1.
    resumed = root / f"{tag}2-resumed-at-{tag}1"
    if resumed.exists():
        shutil.rmtree(resumed)
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    shutil.copytree(rundir.step_dir(two, half), rundir.step_dir(resumed, half))
    cfg = yaml.safe_load((two / "config.yaml").read_text())
    cfg["trainer"]["parallel"][key] = 1
    (resumed / "config.yaml").write_text(yaml.safe_dump(cfg))
    train(resumed, 1)
    l2, l1, lr = losses(two), losses(one), losses(resumed)
    after = range(half + 1, args.steps + 1)
    return {
        "check": tag,
        "model": args.model,
        "micro_batch_size": args.mbs,
        "steps": args.steps,
        f"{tag}2_vs_{tag}1": compare(l2, l1),
        f"resumed_at_{tag}1_vs_{tag}2": compare(lr, l2, after),
        f"resumed_at_{tag}1_vs_{tag}1": compare(lr, l1, after),
        "losses": {f"{tag}2": l2, f"{tag}1": l1, f"{tag}2_resumed_at_{tag}1": lr},
        "speed": {f"{tag}2": speed(two), f"{tag}1": speed(one)},
    }


def check_stop(args, root: Path) -> dict:
    init = init_checkpoint(root, args.model)
    common = {
        "train.max_steps": args.steps,
        "train.micro_batch_size": args.mbs,
        "checkpoint.init_from": str(init),
        "train.engine": "megatron",
        "parallel.tensor": args.tp,
    }
    gpus = args.tp
    straight = make_run(root, "stop-uninterrupted", args.model, common)
    train(straight, gpus)
    stopped = make_run(root, "stop-interrupted", args.model, common)
    procs = start(stopped, gpus)
    at = args.steps // 3
    while not (stopped / "metrics.jsonl").exists() or len(records(stopped)) < at:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:  # what SLURM's --signal does: every task gets the warning signal
        p.send_signal(signal.SIGUSR2)
    first = wait(procs, stopped)
    saved, _ = rundir.checkpoint_steps(stopped)
    second = train(stopped, gpus)
    ls, li = losses(straight), losses(stopped)
    after = range(saved[-1] + 1, args.steps + 1)
    extra = {}
    if args.repeat:  # run-to-run noise of the GPU kernels: the same run twice, uninterrupted
        again = make_run(root, "stop-uninterrupted-again", args.model, common)
        train(again, gpus)
        la = losses(again)
        extra = {
            "uninterrupted_run_to_run_after": compare(la, ls, after),
            "uninterrupted_run_to_run_before": compare(la, ls, range(1, saved[-1] + 1)),
        }
        extra_losses = {"uninterrupted_again": la}
    return {
        **extra,
        "check": "stop",
        "model": args.model,
        "tp": args.tp,
        "signal_after_step": at,
        "first_exit_codes": first,
        "saved_steps": saved,
        "second_exit_codes": second,
        "after_restart_vs_uninterrupted": compare(li, ls, after),
        "before_stop_vs_uninterrupted": compare(li, ls, range(1, saved[-1] + 1)),
        "losses": {"uninterrupted": ls, "interrupted": li, **(extra_losses if extra else {})},
    }


def check_convert(args, root: Path) -> dict:
    """megatron checkpoint -> torch checkpoint; both engines' validation loss on the same batch."""
    common = {
        "train.max_steps": 5,
        "train.micro_batch_size": args.mbs,
        "train.engine": "megatron",
        "checkpoint.every_steps": 5,
        "train.limit_val_batches": 2,
        "train.val_every": 5,
    }
    mrun = make_run(root, "convert-megatron", args.model, {**common, "parallel.tensor": args.tp})
    train(mrun, args.tp)
    out = root / "convert-torch-ckpt"
    if out.exists():
        shutil.rmtree(out)
    conv = subprocess.run(
        [sys.executable, "-m", "bionemo.engines.convert", str(rundir.step_dir(mrun, 5)), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if conv.returncode:
        raise RuntimeError(f"convert failed ({conv.returncode}):\n{conv.stderr[-3000:]}")
    # A torch run initialised from the converted weights, evaluated before any update: one step
    # with lr 0 leaves the weights as they are, and validation runs after it.
    trun = make_run(
        root,
        "convert-torch",
        args.model,
        {
            **common,
            "train.engine": "torch",
            "checkpoint.init_from": str(out),
            "train.max_steps": 1,
            "train.val_every": 1,
            "optim.lr": 1e-30,
            "checkpoint.enabled": False,
        },
    )
    train(trun, 1)
    mv = [json.loads(x) for x in (mrun / "metrics.jsonl").read_text().splitlines()]
    tv = [json.loads(x) for x in (trun / "metrics.jsonl").read_text().splitlines()]
    m_val = [r["loss"] for r in mv if r["kind"] == "valid"][-1]
    t_val = [r["loss"] for r in tv if r["kind"] == "valid"][-1]
    return {
        "check": "convert",
        "model": args.model,
        "tp": args.tp,
        "megatron_valid_loss_at_step_5": m_val,
        "torch_valid_loss_from_converted": t_val,
        "abs_diff": abs(m_val - t_val),
    }


CHECKS = {
    "parity": check_parity,
    "tp": check_tp,
    "pp": check_pp,
    "stop": check_stop,
    "convert": check_convert,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("check", nargs="+", choices=sorted(CHECKS))
    p.add_argument("--model", default="esm2_650m")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--mbs", type=int, default=16)
    p.add_argument("--tp", type=int, default=1, help="stop/convert: tensor-parallel size")
    p.add_argument("--gpus", type=int, default=None)
    p.add_argument(
        "--repeat",
        action="store_true",
        help="stop: also run the uninterrupted run twice (run-to-run noise)",
    )
    p.add_argument("--compile", action="store_true", help="torch engine with train.compile")
    p.add_argument(
        "--precision",
        default="bf16-mixed",
        choices=["bf16-mixed", "fp32"],
        help="parity: train.precision of both engines (fp32 separates implementation "
        "from bf16 rounding)",
    )
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "megatron_check")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    args.gpus = args.gpus or torch.cuda.device_count()
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    status = 0
    for name in args.check:
        t0 = time.time()
        try:
            result = CHECKS[name](args, args.work_dir)
        except Exception as e:  # keep going: the other checks' results are still worth having
            result = {"check": name, "error": str(e)[-6000:]}
            status = 1
        result.update(
            environment=env,
            wall_s=round(time.time() - t0, 1),
            command="python -m benchmarks.megatron_check "
            + " ".join(sys.argv[1:] if argv is None else argv),
        )
        path = args.out / (
            f"{name}-{args.model}{'-tp' + str(args.tp) if args.tp > 1 else ''}"
            f"{'-fp32' if args.precision == 'fp32' else ''}.json"
        )
        path.write_text(json.dumps(result, indent=1))
        brief = {k: v for k, v in result.items() if k not in ("losses", "environment")}
        print(json.dumps(brief, indent=1), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
