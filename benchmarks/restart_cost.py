"""Restart cost with and without the compile cache, and the training time blocked per checkpoint
save, synchronous vs asynchronous (issue 15). One GPU, one process per start, no scheduler:

    python3 benchmarks/restart_cost.py --out OUT [--model esm2_650m] [--budget 225]

Every start runs `python -m bionemo.train RUN` through benchmarks/slurm_gpu/timed_train.py (its
`[timing]` stamps), with train.compile on and the compile cache folder bionemo/train.py sets:
  1. `async`: empty cache; periodic saves asynchronous (checkpoint.async_save), the last synchronous.
  2. `sync`:  the same run with synchronous saves (it uses the first run's cache folder, so its
              start is also a first start with a warm cache).
  3. `restart_warm`: the first run resumed from its last checkpoint, its own (warm) cache; killed
              once the first step is done.
  4. `restart_cold`: the same with an empty cache folder (what a restart cost before), if the
              budget still allows.
Writes summary.json and logs.tar.gz (each start's log, config and metrics; no checkpoints) to OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bionemo.train import COMPILE_CACHE, use_compile_cache  # noqa: E402 -- torch-free

TIMED = REPO / "benchmarks" / "slurm_gpu" / "timed_train.py"
CACHE_LINE = re.compile(
    r"compile cache (\S+): fx graph hits (\d+) misses (\d+), "
    r"aot autograd hits (\d+) misses (\d+)"
)


def say(msg: str) -> None:
    print(f"[restart_cost {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_run(run: Path, args, async_save: bool) -> None:
    preset = yaml.safe_load((REPO / "configs" / "models" / f"{args.model}.yaml").read_text())
    t = preset["trainer"]
    t["model"]["seq_length"] = args.seq_length
    data = args.data.resolve()
    t["data"] = {
        "train_clusters": str(data / "train_clusters.parquet"),
        "database": str(data / "proteins.sqlite"),
        "pad_to": "max_length",
    }
    t["optim"]["warmup_steps"] = 10
    t["train"] = {
        "max_steps": args.steps,
        "micro_batch_size": args.mbs,
        "compile": True,
        "log_every": 5,
        "device": args.device,
    }
    if args.device == "cpu":  # a check of this script on a machine without a GPU
        t["train"]["precision"] = "fp32"
    if args.num_layers:
        t["model"]["num_layers"] = args.num_layers
    t["checkpoint"] = {
        "every_steps": args.every,
        "keep_last": 1,
        "async_save": async_save,
        "export_final": False,
    }
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(preset))


def start(
    run: Path,
    name: str,
    deadline: float,
    cache: Path | None = None,
    stop_after_first_step: bool = False,
    sleep: float = 0.0,
) -> dict:
    """One process start of the trainer on `run`; its log is run/<name>.log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BIONEMO_STEP_SLEEP": str(sleep)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # a folder the user chose: kept as it is
    use_compile_cache(run, env)  # as bionemo.train.main (timed_train.py does not set it)
    log_file = run / f"{name}.log"
    t0 = time.time()
    with open(log_file, "w") as log:
        log.write(f"[timing] {t0:.3f} process start\n")
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, str(TIMED), "-m", "bionemo.train", str(run)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        killed = timed_out = False
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                timed_out = True
                break
            if stop_after_first_step and CACHE_LINE.search(log_file.read_text(errors="replace")):
                proc.send_signal(signal.SIGKILL)  # the first step is done; nothing more to time
                killed = True
                break
            time.sleep(0.2)
        rc = proc.wait()
    wall = time.time() - t0
    text = log_file.read_text(errors="replace")
    stamps = [(float(t), p) for t, p in re.findall(r"^\[timing\] (\d+\.\d+) (.+)$", text, re.M)]
    phases, prev = [], t0
    for t, phase in stamps:
        phases.append({"phase": phase, "at_s": round(t - t0, 2), "took_s": round(t - prev, 2)})
        prev = t
    first = next((t for t, p in stamps if p == "first step done"), None)
    hit = CACHE_LINE.search(text)
    out = {
        "name": name,
        "rc": rc,
        "killed_after_first_step": killed,
        "timed_out": timed_out,
        "wall_s": round(wall, 1),
        "cache_dir": env["TORCHINDUCTOR_CACHE_DIR"],
        "start_to_first_step_s": round(first - t0, 2) if first else None,
        "phases": phases,
    }
    if hit:
        out["compile_cache"] = dict(
            zip(["fx_hits", "fx_misses", "aot_hits", "aot_misses"], map(int, hit.groups()[1:]))
        )
    say(
        f"{name}: rc={rc} wall {wall:.1f}s first step at {out['start_to_first_step_s']}s "
        f"cache {out.get('compile_cache')} (log tail: {text.strip().splitlines()[-1:]} )"
    )
    return out


def saves(run: Path, log_name: str) -> list[dict]:
    """The run's checkpoint records, with when a background write was committed."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    committed = {}
    log = (run / log_name).read_text(errors="replace")
    for day, ms, step in re.findall(
        r"^(\S+ \S+),(\d+) .*saved \S+step-0*(\d+) "
        r"\(written in the background\)",
        log,
        re.M,
    ):
        committed[int(step)] = time.mktime(time.strptime(day, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
    out = []
    for r in recs:
        if r["kind"] != "checkpoint":
            continue
        row = {"step": r["step"], "async": r["async"], "blocking_s": round(r["save_blocking_s"], 3)}
        if r["step"] in committed:  # from the save's start to the commit seen by poll()
            row["write_to_commit_s"] = round(
                committed[r["step"]] - (r["time"] - r["save_blocking_s"]), 2
            )
        out.append(row)
    return out


def step_times(run: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [
        {k: r.get(k) for k in ("step", "loss", "time", "tokens_per_s", "peak_memory_gib") if k in r}
        for r in recs
        if r["kind"] == "train"
    ]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", type=Path, default=Path("/tmp/restart_cost"))
    p.add_argument("--data", type=Path, default=REPO / "data" / "sample")
    p.add_argument("--model", default="esm2_650m")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--mbs", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--device", default="cuda", help="cpu: a check of this script")
    p.add_argument("--num-layers", type=int, help="shrink the model (the CPU check)")
    p.add_argument(
        "--sleep",
        type=float,
        default=0.5,
        help="BIONEMO_STEP_SLEEP: seconds added per step, so a background write has "
        "time to finish before the next save (real runs save minutes apart)",
    )
    p.add_argument("--budget", type=float, default=225, help="seconds for everything")
    args = p.parse_args()
    t_begin = time.monotonic()
    deadline = t_begin + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "starts": {}}

    def write() -> None:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))

    # Versions and inductor's cache defaults, in a process of their own beside the first run.
    probe = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import json, torch, torch._inductor.config as i, torch._functorch.config as f;"
                "print(json.dumps({'torch': torch.__version__, 'gpu': torch.cuda.is_available() and torch.cuda.get_device_name(0),"
                "'fx_graph_cache': i.fx_graph_cache, 'autograd_cache': f.enable_autograd_cache,"
                "'bundle_triton_into_fx_graph_cache': i.bundle_triton_into_fx_graph_cache}))"
            ),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    a, b = args.runs / "async", args.runs / "sync"
    make_run(a, args, async_save=True)
    make_run(b, args, async_save=False)
    s = summary["starts"]
    s["async"] = start(a, "first", deadline, sleep=args.sleep)
    summary["probe"] = probe.communicate()[0].strip()
    s["async"]["saves"] = saves(a, "first.log")
    s["async"]["steps"] = step_times(a)
    write()
    s["sync"] = start(b, "first", deadline, cache=a / COMPILE_CACHE, sleep=args.sleep)
    s["sync"]["saves"] = saves(b, "first.log")
    s["sync"]["steps"] = step_times(b)
    write()
    # The restarts: the async run, a few steps longer, resumes from its last checkpoint (and
    # rewinds metrics.jsonl to it: keep the first start's records).
    (a / "first.metrics.jsonl").write_bytes((a / "metrics.jsonl").read_bytes())
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    cfg["trainer"]["train"]["max_steps"] = args.steps + 10
    (a / "config.yaml").write_text(yaml.safe_dump(cfg))
    (a / "finished").unlink(missing_ok=True)
    s["restart_warm"] = start(a, "restart_warm", deadline, stop_after_first_step=True)
    write()
    # The cold restart needs about the warm one plus the compile the cache saved.
    saved = (s["async"]["start_to_first_step_s"] or 0) - (s["sync"]["start_to_first_step_s"] or 0)
    if deadline - time.monotonic() > s["restart_warm"]["wall_s"] + saved + 10:
        empty = args.runs / "empty_cache"
        empty.mkdir()
        s["restart_cold"] = start(
            a, "restart_cold", deadline, cache=empty, stop_after_first_step=True
        )
    else:
        summary["restart_cold"] = "skipped: too little of the budget left"
    summary["total_s"] = round(time.monotonic() - t_begin, 1)
    write()
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        for run in (a, b):
            for f in (
                sorted(run.glob("*.log"))
                + sorted(run.glob("*metrics.jsonl"))
                + [run / "config.yaml"]
            ):
                tar.add(f, arcname=f"{run.name}/{f.name}")
    say(f"done in {summary['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
