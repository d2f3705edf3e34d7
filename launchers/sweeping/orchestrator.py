"""The sweep's orchestrator: the process that runs the trials of one sweep and writes its results.

    python -m launchers.sweeping --base-config RUN_DIR/config.yaml --model esm2_8m ...

Users do not type this: `python -m launchers sweep` (any backend, `make sweep` with or without
BACKEND) resolves and validates the sweep section, writes the run directory and starts this with
a command line that launchers/sweep.py derives from the resolved config (`command()`). Its flags
are that hand-over, not a second user grammar; trainer overrides reach it only through
--base-config (the launcher's override parser).

Search, per recompute policy: start at --min, double until a size does not fit (or --max fits),
then bisect between the last size that fit and the first that did not. Recompute policies need
less memory than "none", so each later policy starts at the largest size the previous one fit.

Trials run on this machine (one process per GPU, torchrun-style variables; the local backend),
or, with --inside-allocation, as one `srun` job step each inside the current SLURM allocation.
Results: <out>/<gpu>/<model>.json|csv|md and PNG plots; --write-table updates that model's row in
<tables>/<gpu>.yaml. Details: docs/sweep.md.

This process never imports torch: a CUDA context here would hold GPU memory the trials need.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import socket
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from bionemo.config import FP8_RECIPES, STRATEGIES, TrainerConfig
from launchers.sweeping import MODULE
from launchers.sweeping.results import table_row, update_table, write_results
from launchers.paths import REPO_ROOT, project_commit
from launchers.sweeping.search import POLICIES, SweepError, search, summarize, variant_label
from launchers.sweeping.trials import (
    Runner,
    detect_device,
    gpu_table_name,
    load_base,
    prepare_data,
    torch_version,
    trial_config,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="preset name: configs/models/<model>.yaml")
    p.add_argument(
        "--gpus-per-trial",
        type=int,
        default=1,
        help="processes per node in each trial (GPUs per node; CPU: ranks per node)",
    )
    p.add_argument(
        "--nodes", type=int, default=1, help="nodes per trial (needs --inside-allocation)"
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (parallel.tensor)")
    p.add_argument(
        "--memory-cap-gib",
        type=float,
        default=None,
        help="cap each trial's GPU memory (emulates a smaller card)",
    )
    p.add_argument("--min", type=int, default=1, help="smallest micro batch to try")
    p.add_argument("--max", type=int, default=512, help="largest micro batch to try")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps dropped before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps per trial")
    p.add_argument(
        "--recompute",
        default=",".join(POLICIES),
        help="comma-separated activation_checkpointing policies to sweep",
    )
    p.add_argument(
        "--strategy",
        default=None,
        help="comma-separated parallel.data_parallel strategies to search, e.g. ddp,fsdp "
        "(default: the base config's)",
    )
    p.add_argument(
        "--fp8",
        default=None,
        help="comma-separated train.fp8 recipes to search, e.g. none,tensorwise "
        "(default: the base config's)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train.compile in every trial (default: the base config's value)",
    )
    p.add_argument(
        "--gpu-name",
        default=None,
        help="table name, e.g. h100_80gb (default: detected; 'cpu' without a GPU)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("runs/sweep"),
        help="trial run directories (must be on a filesystem every node sees)",
    )
    p.add_argument(
        "--tables",
        type=Path,
        default=Path("configs/benchmarks"),
        help="folder of benchmark tables for --write-table",
    )
    p.add_argument(
        "--write-table",
        action="store_true",
        help="update this model's row in <tables>/<gpu>.yaml from the measurement",
    )
    p.add_argument(
        "--cpu-memory-limit-gib",
        type=float,
        default=None,
        help="CPU only: address-space limit (RLIMIT_AS) of every trial process",
    )
    p.add_argument(
        "--inside-allocation",
        action="store_true",
        help="run each trial as an srun step of the current SLURM job",
    )
    p.add_argument(
        "--trial-timeout",
        type=float,
        default=1800,
        help="seconds before a trial counts as hung (covers torch.compile start-up)",
    )
    # Set by `python -m launchers sweep` (launchers/sweep.py: command):
    p.add_argument(
        "--base-config",
        type=Path,
        required=True,
        help="the run's resolved config.yaml: its trainer section is every trial's base",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter of the trial processes (e.g. the container's)",
    )
    p.add_argument(
        "--srun-arg",
        dest="srun_args",
        action="append",
        default=[],
        metavar="--FLAG[=VALUE]",
        help="extra flag for each trial's srun step, e.g. --srun-arg=--overlap",
    )
    p.add_argument(
        "--copy-results",
        type=Path,
        default=None,
        metavar="DIR",
        help="also copy the result files into DIR (the launcher's run directory)",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the results
    args.recompute = [x.strip() for x in args.recompute.split(",") if x.strip()]
    unknown = sorted(set(args.recompute) - set(POLICIES))
    if unknown or not args.recompute:
        p.error(
            f"--recompute takes a comma-separated subset of {', '.join(POLICIES)}; got {unknown}"
        )
    args.recompute = [x for x in POLICIES if x in args.recompute]  # most memory first (see search)
    for flag, choices in (("strategy", STRATEGIES), ("fp8", FP8_RECIPES)):
        value = getattr(args, flag)
        if value is None:
            continue
        items = [x.strip() for x in value.split(",") if x.strip()]
        if not items or set(items) - set(choices) or len(set(items)) != len(items):
            p.error(
                f"--{flag} takes a comma-separated subset of {', '.join(choices)}; got {value!r}"
            )
        setattr(args, flag, items)
    if not 1 <= args.min <= args.max:
        p.error(f"need 1 <= --min <= --max, got {args.min} and {args.max}")
    if args.gpus_per_trial < 1 or args.nodes < 1 or args.steps < 1 or args.warmup_steps < 0:
        p.error("--gpus-per-trial, --nodes and --steps must be >= 1, --warmup-steps >= 0")
    if args.nodes > 1 and not args.inside_allocation:
        p.error("a trial on several nodes runs inside a SLURM allocation: add --inside-allocation")
    return args


def run_sweep(args: argparse.Namespace) -> dict:
    preset = load_base(args)
    world = args.gpus_per_trial * args.nodes
    first = trial_config(preset, args, args.recompute[0], args.min)  # fail early on a bad config
    TrainerConfig.model_validate(first).data.check_files()
    prepare_data(first)
    device, is_gpu = detect_device()
    is_gpu = is_gpu and first["train"]["device"] != "cpu"  # train.device=cpu: CPU trials anyway
    gpu = args.gpu_name or (gpu_table_name(device) if is_gpu else "cpu")
    if args.cpu_memory_limit_gib and is_gpu:
        raise ValueError(
            "--cpu-memory-limit-gib is for CPU trials: CUDA reserves far more address "
            "space than any limit allows; cap GPU memory with --memory-cap-gib"
        )
    if args.inside_allocation and "SLURM_JOB_ID" not in os.environ:
        raise ValueError(
            "--inside-allocation needs a SLURM job (no SLURM_JOB_ID): run it in the "
            "batch script of an allocation of --nodes nodes, see docs/sweep.md"
        )
    work_dir = (args.work_dir / gpu / args.model).resolve()
    print(
        f"[sweep] {args.model} on {gpu} ({device}): world size {world}, micro batch "
        f"{args.min}..{args.max}, recompute {', '.join(args.recompute)}; trials in {work_dir}",
        flush=True,
    )

    # Strategy x FP8 variants: each gets the whole recompute search. Default: the base config's.
    strategies = args.strategy or [first["parallel"]["data_parallel"]]
    recipes = args.fp8 or [first["train"]["fp8"]]
    variants = [(dp, fp8) for dp in strategies for fp8 in recipes]
    for variant in variants:  # validated before any trial (FSDP vs engine, FP8 vs device)
        trial_config(preset, args, args.recompute[0], args.min, variant)

    runner = Runner(args, preset, work_dir)
    for variant in variants:
        start = args.min
        for policy in args.recompute:
            best = search(lambda m: runner(policy, m, variant).fits, args.min, args.max, start)
            print(
                f"[sweep] {variant_label(*variant)} {policy}: largest micro batch that fits: "
                f"{best}",
                flush=True,
            )
            start = best or args.min  # recompute only lowers memory: the next policy starts here

    found = [
        {
            "data_parallel": dp,
            "fp8": fp8,
            "label": variant_label(dp, fp8),
            "policies": {
                p: summarize(runner.trials, p, args.max, (dp, fp8)) for p in args.recompute
            },
        }
        for dp, fp8 in variants
    ]
    # The result's (and the table's) variant: the fastest with the first policy (recompute none,
    # which tables describe); ties and no fit: the first listed.
    ref = args.recompute[0]
    chosen = max(
        found,
        key=lambda v: v["policies"][ref].get("tokens_per_s_per_gpu") or -1.0,
    )
    policies = chosen["policies"]
    best_variant = (chosen["data_parallel"], chosen["fp8"])
    best_config = None
    if policies[ref]["micro_batch_size"] is not None:
        best_config = trial_config(
            preset, args, ref, policies[ref]["micro_batch_size"], best_variant
        )
    return {
        "model": args.model,
        "gpu": gpu,
        "command": shlex.join(["python", "-m", MODULE, *args.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": device,
        "torch": torch_version(),
        "git_commit": project_commit(),
        "world_size": world,
        "gpus_per_trial": args.gpus_per_trial,
        "nodes": args.nodes,
        "tensor_parallel": args.tp,
        "seq_length": first["model"]["seq_length"],
        "memory_cap_gib": args.memory_cap_gib,
        "cpu_memory_limit_gib": args.cpu_memory_limit_gib,
        "compile": first["train"]["compile"],
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "inside_allocation": args.inside_allocation,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID") if args.inside_allocation else None,
        "search": {"min": args.min, "max": args.max},
        "variants": found,
        "policies": policies,  # the chosen variant's
        "best": {
            "data_parallel": best_variant[0],
            "fp8": best_variant[1],
            "recompute": ref,
            "micro_batch_size": policies[ref]["micro_batch_size"],
            "config": best_config,
        },
        "trials": [asdict(t) for t in runner.trials],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_sweep(args)
    except SweepError as e:
        print(f"[sweep] stopped: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # configuration problems, before any trial
        print(f"[sweep] error: {e}", file=sys.stderr)
        return 2
    folder = args.out / result["gpu"]
    for path in write_results(result, folder, args.model):
        print(f"[sweep] wrote {path}")
        if args.copy_results is not None:  # the run directory keeps its own copy
            args.copy_results.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, args.copy_results / path.name)
    if args.copy_results is not None:
        print(f"[sweep] copied the results into {args.copy_results}")
    if args.write_table:
        if (
            "none" not in result["policies"]
            or result["policies"]["none"]["micro_batch_size"] is None
        ):
            print(
                "[sweep] --write-table needs a fitting micro batch with recompute 'none' (the "
                "policy tables describe)",
                file=sys.stderr,
            )
            return 1
        table = args.tables / f"{result['gpu']}.yaml"
        old = (
            ((yaml.safe_load(table.read_text()) or {}).get("rows") or {}).get(args.model, {})
            if table.exists()
            else {}
        )
        source = folder / f"{args.model}.json"
        if source.resolve().is_relative_to(REPO_ROOT.resolve()):  # a path the repository knows
            source = source.resolve().relative_to(REPO_ROOT.resolve())
        update_table(table, result["gpu"], args.model, table_row(result, old or {}, str(source)))
        print(f"[sweep] updated row {args.model} of {table}")
    return 0
