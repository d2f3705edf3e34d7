"""Data-parallel scaling on one host: the same model and micro batch per GPU at 1, 2, 4, ... GPUs
(weak scaling, as a data-parallel job grows), each a real trainer run started by the sweep's
trial runner. Efficiency at N GPUs = tokens/s/GPU at N / tokens/s/GPU at the smallest N.

    python -m benchmarks.scaling --model esm2_650m --gpus 2,4,8 --mbs 16
    python -m benchmarks.scaling --model esm2_8m --gpus 1,2 --mbs 8 --set train.device=cpu   # CPU

Writes <out>/<gpu>/scaling-<model>.json and .md (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from launchers.paths import project_commit  # noqa: E402
from launchers.sweeping import orchestrator, search, trials  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--gpus", default="1,2,4", help="comma-separated GPU counts, smallest first")
    p.add_argument("--mbs", type=int, required=True, help="micro batch per GPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "scaling")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.gpus = sorted({int(x) for x in args.gpus.split(",") if x.strip()})
    except ValueError:
        p.error(f"--gpus takes comma-separated integers, got {args.gpus!r}")
    if not args.gpus or args.gpus[0] < 1:
        p.error("--gpus needs at least one count >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    device, is_gpu = trials.detect_device()
    gpu = trials.gpu_table_name(device) if is_gpu else "cpu"
    # The trials' base: the model preset with the --set overrides (YAML values).
    base = trials.load_preset(args.model)
    for item in args.overrides:
        key, _, value = item.partition("=")
        trials.set_dotted(base, key, yaml.safe_load(value))
    work = (args.work_dir / gpu / args.model).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base_file = work / "base.yaml"
    base_file.write_text(yaml.safe_dump({"trainer": base}))
    points = []
    for n in args.gpus:
        sweep_args = orchestrator.parse_args(
            [
                "--model",
                args.model,
                "--gpus-per-trial",
                str(n),
                "--min",
                str(args.mbs),
                "--max",
                str(args.mbs),
                "--recompute",
                "none",
                "--steps",
                str(args.steps),
                "--warmup-steps",
                str(args.warmup_steps),
                "--base-config",
                str(base_file),
            ]
        )
        runner = trials.Runner(
            sweep_args,
            trials.load_base(sweep_args),
            (args.work_dir / gpu / args.model / f"gpus{n}").resolve(),
        )
        print(f"[scaling] {n} GPU(s): ", end="", flush=True)
        trial = runner("none", args.mbs)
        if not trial.fits:
            raise search.SweepError(f"micro batch {args.mbs} does not fit at {n} GPU(s)")
        points.append(
            {
                "gpus": n,
                "tokens_per_s_per_gpu": trial.tokens_per_s_per_gpu,
                "tokens_per_s": trial.tokens_per_s_per_gpu * n,
                "mfu": trial.mfu,
                "peak_memory_gib": trial.peak_memory_gib,
                "run_dir": trial.run_dir,
            }
        )
    base = points[0]["tokens_per_s_per_gpu"]
    for p in points:
        p["efficiency"] = round(p["tokens_per_s_per_gpu"] / base, 4)
    return {
        "model": args.model,
        "gpu": gpu,
        "device": device,
        "micro_batch_size": args.mbs,
        "scaling": "weak (fixed micro batch per GPU, data parallel)",
        "command": shlex.join(["python", "-m", "benchmarks.scaling", *args.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "torch": trials.torch_version(),
        "git_commit": project_commit(),
        "timed_steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "points": points,
    }


def markdown(r: dict) -> str:
    lines = [
        f"# Data-parallel scaling: {r['model']} on {r['device']}",
        "",
        f"`{r['command']}` ({r['date']}, torch {r['torch']}, commit {r['git_commit']})",
        "",
        f"Micro batch {r['micro_batch_size']} per GPU, {r['scaling']}; medians over "
        f"{r['timed_steps']} timed steps after {r['warmup_steps']} warm-up steps.",
        "",
        "| GPUs | tokens/s/GPU | tokens/s | efficiency | MFU | peak GiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r["points"]:
        mfu = "-" if p["mfu"] is None else f"{p['mfu']:.1%}"
        lines.append(
            f"| {p['gpus']} | {p['tokens_per_s_per_gpu']:,.0f} | {p['tokens_per_s']:,.0f} "
            f"| {p['efficiency']:.1%} | {mfu} | {p['peak_memory_gib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except search.SweepError as e:
        print(f"[scaling] stopped: {e}", file=sys.stderr)
        return 1
    folder = args.out / result["gpu"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"scaling-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"scaling-{args.model}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"[scaling] wrote {folder / f'scaling-{args.model}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
