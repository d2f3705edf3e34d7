"""Micro-batch sweep: the largest micro batch that trains, and what every size tried delivers.

    python -m benchmarks.sweep --model esm2_650m [--gpus-per-trial 8] [--memory-cap-gib 80] ...
    make sweep MODEL=esm2_650m ARGS="--gpus-per-trial 8"

A trial is a short run of the real trainer, nothing else: a run directory whose config.yaml is the
model preset plus the trial's settings (micro batch, recompute policy, no checkpoints, padding to
seq_length, no validation), started as `python -m bionemo.train <dir>` on `world` fresh processes
(one process group per trial, with the production data-parallel size), then read back from its
metrics.jsonl. Exit code 12 (OOM_EXIT_CODE) means "did not fit", a finding; any other failure stops
the sweep with that trial's log tail.

Search, per recompute policy: start at --min, double until a size does not fit (or --max fits),
then bisect between the last size that fit and the first that did not. Recompute policies need
less memory than "none", so each later policy starts at the largest size the previous one fit.

Trials run on this machine (one process per GPU, torchrun-style variables), or, with
--inside-allocation, as one `srun` job step each inside the current SLURM allocation (what
`python -m launchers sweep` submits: --base-config is then the run's resolved config.yaml).
Results: <out>/<gpu>/<model>.json|csv|md and PNG plots; --write-table updates that model's row in
configs/benchmarks/<gpu>.yaml. Details and the CPU memory-limit mode: docs/sweep.md.

This process never imports torch: a CUDA context here would hold GPU memory the trials need.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from bionemo import rundir
from bionemo.config import OOM_EXIT_CODE, TrainerConfig, dump_trainer_config

REPO_ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("none", "selective", "full")  # model.activation_checkpointing, most memory first
# Substring of the device name (upper case) -> benchmark table name (configs/benchmarks/<name>.yaml).
GPU_TABLES = {"H200": "h200_141gb", "H100": "h100_80gb", "A100": "a100_80gb"}
# After one rank fails, the others may be blocked in a collective that never completes (NCCL waits
# 10 minutes by default); give them this long to exit by themselves, then kill them.
FAILURE_GRACE_S = 30
LOG_TAIL_LINES = 30


class SweepError(RuntimeError):
    """A trial failed for a reason other than running out of memory: the sweep stops."""


@dataclass
class Trial:
    recompute: str
    micro_batch_size: int
    fits: bool
    tokens_per_s_per_gpu: float | None = None  # padded tokens, median over the timed steps
    useful_tokens_per_s_per_gpu: float | None = None
    tflops_per_gpu: float | None = None
    mfu: float | None = None  # None on CPU (no peak FLOP/s to divide by)
    peak_memory_gib: float | None = None  # GPU: max allocated; CPU: peak resident set
    seconds: float = 0.0  # wall time of the whole trial, start-up included
    run_dir: str = ""


# ------------------------------------------------------------------------------------ configuration


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="preset name: configs/models/<model>.yaml")
    p.add_argument("--gpus-per-trial", type=int, default=1,
                   help="processes per node in each trial (GPUs per node; CPU: ranks per node)")
    p.add_argument("--nodes", type=int, default=1, help="nodes per trial (needs --inside-allocation)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (parallel.tensor)")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="cap each trial's GPU memory (emulates a smaller card)")
    p.add_argument("--min", type=int, default=1, help="smallest micro batch to try")
    p.add_argument("--max", type=int, default=512, help="largest micro batch to try")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps dropped before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps per trial")
    p.add_argument("--recompute", default=",".join(POLICIES),
                   help="comma-separated activation_checkpointing policies to sweep")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="train.compile in every trial (default: the base config's value)")
    p.add_argument("--gpu-name", default=None,
                   help="table name, e.g. h100_80gb (default: detected; 'cpu' without a GPU)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    p.add_argument("--work-dir", type=Path, default=Path("runs/sweep"),
                   help="trial run directories (must be on a filesystem every node sees)")
    p.add_argument("--tables", type=Path, default=Path("configs/benchmarks"),
                   help="folder of benchmark tables for --write-table")
    p.add_argument("--write-table", action="store_true",
                   help="update this model's row in <tables>/<gpu>.yaml from the measurement")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="trainer overrides, e.g. model.num_layers=2")
    p.add_argument("--cpu-memory-limit-gib", type=float, default=None,
                   help="CPU only: address-space limit (RLIMIT_AS) of every trial process")
    p.add_argument("--inside-allocation", action="store_true",
                   help="run each trial as an srun step of the current SLURM job")
    p.add_argument("--trial-timeout", type=float, default=1800,
                   help="seconds before a trial counts as hung (covers torch.compile start-up)")
    # Set by `python -m launchers sweep` (docs/sweep.md, Through the launcher):
    p.add_argument("--base-config", type=Path, default=None,
                   help="a resolved config.yaml whose trainer section replaces the model preset")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter of the trial processes (e.g. the container's)")
    p.add_argument("--srun-arg", dest="srun_args", action="append", default=[],
                   metavar="--FLAG[=VALUE]",
                   help="extra flag for each trial's srun step, e.g. --srun-arg=--overlap")
    p.add_argument("--copy-results", type=Path, default=None, metavar="DIR",
                   help="also copy the result files into DIR (the launcher's run directory)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the results
    args.recompute = [x.strip() for x in args.recompute.split(",") if x.strip()]
    unknown = sorted(set(args.recompute) - set(POLICIES))
    if unknown or not args.recompute:
        p.error(f"--recompute takes a comma-separated subset of {', '.join(POLICIES)}; got {unknown}")
    args.recompute = [x for x in POLICIES if x in args.recompute]  # most memory first (see search)
    if not 1 <= args.min <= args.max:
        p.error(f"need 1 <= --min <= --max, got {args.min} and {args.max}")
    if args.gpus_per_trial < 1 or args.nodes < 1 or args.steps < 1 or args.warmup_steps < 0:
        p.error("--gpus-per-trial, --nodes and --steps must be >= 1, --warmup-steps >= 0")
    if args.nodes > 1 and not args.inside_allocation:
        p.error("a trial on several nodes runs inside a SLURM allocation: add --inside-allocation")
    return args


def load_base(args: argparse.Namespace) -> dict:
    """The trainer section trials start from: --base-config's, else the model preset's."""
    if args.base_config is None:
        return load_preset(args.model)
    raw = yaml.safe_load(args.base_config.read_text()) or {}
    if not isinstance(raw.get("trainer"), dict):
        raise ValueError(f"{args.base_config} has no trainer section")
    return raw["trainer"]


def load_preset(model: str) -> dict:
    path = REPO_ROOT / "configs" / "models" / f"{model}.yaml"
    if not path.is_file():
        known = sorted(q.stem for q in path.parent.glob("*.yaml"))
        raise ValueError(f"no model preset {path}; presets: {', '.join(known)}")
    raw = yaml.safe_load(path.read_text()) or {}
    return raw.get("trainer", raw)


def set_dotted(cfg: dict, key: str, value) -> None:
    """cfg['a']['b'] = value for key 'a.b' (a leading 'trainer.' is accepted and dropped)."""
    parts = key.removeprefix("trainer.").split(".")
    for part in parts[:-1]:
        cfg = cfg.setdefault(part, {})
        if not isinstance(cfg, dict):
            raise ValueError(f"--set {key}: {part} is not a section")
    cfg[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, object]]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
        out.append((key, yaml.safe_load(value)))  # YAML typing: 2 -> int, null -> None, true -> bool
    return out


def absolute_data_paths(cfg: TrainerConfig) -> TrainerConfig:
    """Data paths relative to the repository (as `make` runs), made absolute in place."""
    for name, value in cfg.data:
        if isinstance(value, Path) and not value.is_absolute():
            setattr(cfg.data, name, REPO_ROOT / value)
    return cfg


def trial_config(preset: dict, args: argparse.Namespace, policy: str, micro_batch: int) -> dict:
    """The validated trainer section of one trial (preset or base config < --set < the sweep's own
    settings)."""
    cfg = json.loads(json.dumps(preset))  # deep copy
    for key, value in parse_overrides(args.overrides):
        set_dotted(cfg, key, value)
    own = {
        "train.micro_batch_size": micro_batch,
        "train.global_batch_size": None,  # one micro batch per rank per step: no accumulation
        "train.max_steps": args.warmup_steps + args.steps,
        "train.log_every": 1,  # one record per step, so the warm-up steps can be dropped
        "train.limit_val_batches": 0,
        "train.memory_cap_gib": args.memory_cap_gib,
        "checkpoint.enabled": False,
        "data.pad_to": "max_length",  # padded-token throughput, the figure tables quote
        "model.activation_checkpointing": policy,
        "parallel.tensor": args.tp,
        "logging.wandb_project": None,
    }
    if args.compile is not None:  # else the preset's (or base config's) choice stands
        own["train.compile"] = args.compile
    for key, value in own.items():
        set_dotted(cfg, key, value)
    validated = absolute_data_paths(TrainerConfig.model_validate(cfg))
    validated.check_parallel(args.gpus_per_trial * args.nodes)
    return dump_trainer_config(validated)


# ------------------------------------------------------------------------------------ environment


def gpu_table_name(device_name: str) -> str:
    upper = device_name.upper()
    table = next((v for k, v in GPU_TABLES.items() if k in upper), None)
    return table or re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


def detect_device() -> tuple[str, bool]:
    """(device name, is a GPU), from nvidia-smi so that this process creates no CUDA context."""
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True)
        names = out.stdout.strip().splitlines()
        if out.returncode == 0 and names:
            return names[0].strip(), True
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"^model name\s*:\s*(.+)$", info, re.M).group(1).strip()
    except (OSError, AttributeError):
        pass
    return cpu, False


def git_commit() -> str | None:
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                         capture_output=True, text=True)
    if out.returncode:
        return None
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def torch_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def first_node_address() -> str:
    """Address of the allocation's first node (srun puts rank 0 there): its NodeAddr."""
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    node = subprocess.run(["scontrol", "show", "node", "-o", hosts[0]],
                          capture_output=True, text=True).stdout
    match = re.search(r"\bNodeAddr=(\S+)", node)
    return match.group(1) if match else hosts[0]


def trial_environment(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"  # complete logs even when a rank is killed
    if args.cpu_memory_limit_gib:
        # Under an address-space limit, reserved-but-unused address space counts like allocated
        # memory. pyarrow's default pool (mimalloc/jemalloc) reserves ~1 GiB up front and glibc
        # reserves 64 MiB per thread arena; without these two settings the limit would measure
        # those reservations (and vary with thread timing) rather than what training allocates.
        env["ARROW_DEFAULT_MEMORY_POOL"] = "system"
        env["MALLOC_ARENA_MAX"] = "1"
    return env


# ------------------------------------------------------------------------------------ trials


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return f"--- {path}: missing"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- last {len(text)} lines of {path}\n" + "\n".join(text)


def _address_space_limit(limit_bytes: int | None):
    if limit_bytes is None:
        return None

    def apply():  # runs in the child between fork and exec: the trainer itself is limited
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def launch_local(run_dir: Path, world: int, env: dict, limit_bytes: int | None,
                 timeout: float, python: str = sys.executable) -> tuple[list[int | None], bool]:
    """One process per rank on this machine; returns (exit codes, timed out)."""
    port = free_port()
    procs = []
    try:
        for rank in range(world):
            # Set even for world 1, so that SLURM variables of a surrounding job are not read.
            rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(world),
                        "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}
            with open(run_dir / f"rank{rank}.log", "w") as log:
                procs.append(subprocess.Popen(
                    [python, "-m", "bionemo.train", str(run_dir)], cwd=REPO_ROOT,
                    env=rank_env, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=_address_space_limit(limit_bytes)))
        deadline, grace_until = time.monotonic() + timeout, None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if grace_until is None and any(p.returncode not in (None, 0) for p in procs):
                grace_until = now + FAILURE_GRACE_S
            if now > deadline or (grace_until is not None and now > grace_until):
                break
            time.sleep(0.1)
        timed_out = grace_until is None and any(p.poll() is None for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], timed_out  # negative: killed by that signal


# Each srun task records its own exit code: srun's reports only the largest, and a rank killed
# while it exits would record none. So no --kill-on-bad-exit: the rank that ran out of memory may
# still be exiting (with 12) when the others already failed at the broken connection to it (with
# 1); killing the step then would hide its 12. --wait gives the remaining ranks FAILURE_GRACE_S
# after the first one ended (they may be stuck in a collective), then srun kills them.
_SRUN_TASK = ('echo "[sweep] rank $SLURM_PROCID of $SLURM_NTASKS on $(hostname) '
              '(node $SLURMD_NODENAME, step $SLURM_JOB_ID.$SLURM_STEP_ID)"; '
              '{limit}"$1" -m bionemo.train "$0"; rc=$?; '
              'echo $rc > "$0/rank$SLURM_PROCID.rc"; exit $rc')


def launch_srun(run_dir: Path, nodes: int, per_node: int, env: dict, limit_bytes: int | None,
                timeout: float, python: str = sys.executable,
                srun_args: list[str] = ()) -> tuple[list[int | None], bool]:
    """One srun job step in the current allocation; returns (exit codes, timed out).
    srun_args: the launcher's flags for the step (CPUs per task, pyxis, the profile's own;
    --overlap when the sweep itself runs in a step, see docs/sweep.md)."""
    world = nodes * per_node
    env = {**env, "MASTER_PORT": str(free_port())}  # the batch script runs on the first node
    env.setdefault("MASTER_ADDR", first_node_address())
    limit = f"ulimit -v {limit_bytes // 1024}; " if limit_bytes else ""  # ulimit -v is in KiB
    cmd = ["srun", f"--nodes={nodes}", f"--ntasks={world}", f"--ntasks-per-node={per_node}",
           "--kill-on-bad-exit=0", f"--wait={FAILURE_GRACE_S}",
           f"--output={run_dir}/rank%t.log", *srun_args,
           "bash", "-c", _SRUN_TASK.format(limit=limit), str(run_dir), python]
    with open(run_dir / "srun.log", "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.terminate()  # srun forwards it to the tasks and ends the step
            try:
                proc.wait(timeout=FAILURE_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            timed_out = True
    codes = []
    for rank in range(world):
        rc_file = run_dir / f"rank{rank}.rc"
        codes.append(int(rc_file.read_text()) if rc_file.is_file() else None)
    if proc.returncode and all(c == 0 for c in codes):
        codes.append(None)  # srun itself failed although every task finished: not a clean trial
    return codes, timed_out


def read_metrics(run_dir: Path, warmup_steps: int) -> dict:
    path = run_dir / rundir.METRICS
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    timed = [r for r in train if r["step"] > warmup_steps]
    if not timed:
        raise SweepError(f"{path} holds no timed step (after the {warmup_steps} warm-up steps)")

    def median(key):
        values = [r.get(key) for r in timed]
        return None if any(v is None for v in values) else statistics.median(values)

    return {
        "tokens_per_s_per_gpu": median("tokens_per_s_per_gpu"),
        "useful_tokens_per_s_per_gpu": median("useful_tokens_per_s_per_gpu"),
        "tflops_per_gpu": median("tflops_per_gpu"),
        "mfu": median("mfu"),
        "peak_memory_gib": max(r["peak_memory_gib"] for r in train),
    }


class Runner:
    """Runs (and remembers) trials: one fresh process group per (policy, micro batch)."""

    def __init__(self, args: argparse.Namespace, preset: dict, work_dir: Path):
        self.args, self.preset, self.work_dir = args, preset, work_dir
        self.world = args.gpus_per_trial * args.nodes
        self.env = trial_environment(args)
        gib = args.cpu_memory_limit_gib
        self.limit_bytes = int(gib * 2**30) if gib else None
        self.trials: list[Trial] = []

    def __call__(self, policy: str, micro_batch: int) -> Trial:
        done = next((t for t in self.trials
                     if t.recompute == policy and t.micro_batch_size == micro_batch), None)
        if done is not None:
            return done
        a = self.args
        run_dir = self.work_dir / f"{policy}-mbs{micro_batch:05d}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cfg = trial_config(self.preset, a, policy, micro_batch)
        (run_dir / rundir.CONFIG).write_text(yaml.safe_dump({"trainer": cfg}, sort_keys=False))
        print(f"[sweep] {policy:9s} micro batch {micro_batch:4d}: ", end="", flush=True)
        t0 = time.monotonic()
        if a.inside_allocation:
            codes, timed_out = launch_srun(run_dir, a.nodes, a.gpus_per_trial, self.env,
                                           self.limit_bytes, a.trial_timeout, a.python,
                                           a.srun_args)
        else:
            codes, timed_out = launch_local(run_dir, self.world, self.env, self.limit_bytes,
                                            a.trial_timeout, a.python)
        seconds = time.monotonic() - t0
        trial = Trial(policy, micro_batch, fits=False, seconds=round(seconds, 2),
                      run_dir=str(run_dir))
        if OOM_EXIT_CODE in codes:  # one rank out of memory is enough; the others may have crashed
            print(f"out of memory ({seconds:.0f} s)", flush=True)
        elif not timed_out and all(c == 0 for c in codes):
            trial.fits = True
            for key, value in read_metrics(run_dir, a.warmup_steps).items():
                setattr(trial, key, value)
            print(describe(trial), flush=True)
        else:
            print("failed", flush=True)
            why = f"did not finish within {a.trial_timeout:.0f} s" if timed_out else \
                f"exit codes per rank {codes} (None: killed or unknown)"
            logs = sorted(run_dir.glob("rank*.log")) + sorted(run_dir.glob("srun.log"))
            raise SweepError(f"trial {policy} micro batch {micro_batch} {why}; the sweep stops "
                             f"here.\n" + "\n".join(_tail(p) for p in logs))
        self.trials.append(trial)
        return trial


def describe(t: Trial) -> str:
    parts = [f"{t.tokens_per_s_per_gpu:,.0f} tokens/s/GPU"]
    if t.tflops_per_gpu is not None:
        parts.append(f"{t.tflops_per_gpu:.3g} TFLOP/s")
    if t.mfu is not None:
        parts.append(f"MFU {100 * t.mfu:.1f}%")
    parts.append(f"peak {t.peak_memory_gib:.2f} GiB ({t.seconds:.0f} s)")
    return ", ".join(parts)


def search(fits, lo: int, hi: int, start: int | None = None) -> int | None:
    """Largest m in [lo, hi] with fits(m), assuming fitting is monotone; None if lo does not fit.

    Doubles from `start` (default lo) until a size does not fit or hi fits, then bisects between
    the last size that fit and the first that did not.
    """
    m = min(max(start or lo, lo), hi)
    last_fit = first_oom = None
    while True:
        if fits(m):
            last_fit = m
            if m >= hi:
                break
            m = min(2 * m, hi)
        else:
            first_oom = m
            break
    if last_fit is None and first_oom > lo:  # started above the floor and that did not fit
        last_fit = lo if fits(lo) else None
    if last_fit is None:
        return None
    while first_oom is not None and first_oom - last_fit > 1:
        mid = (last_fit + first_oom) // 2
        if fits(mid):
            last_fit = mid
        else:
            first_oom = mid
    return last_fit


# ------------------------------------------------------------------------------------ results


def summarize(trials: list[Trial], policy: str, search_max: int) -> dict:
    fit = [t for t in trials if t.recompute == policy and t.fits]
    if not fit:
        return {"max_micro_batch_size": None, "micro_batch_size": None}
    largest = max(fit, key=lambda t: t.micro_batch_size)
    fastest = max(fit, key=lambda t: t.tokens_per_s_per_gpu)
    return {
        "max_micro_batch_size": largest.micro_batch_size,
        # True: --max itself fit, so the real limit is higher (the maximum is a lower bound).
        "max_is_search_limit": largest.micro_batch_size == search_max,
        "micro_batch_size": fastest.micro_batch_size,  # the fastest size that fits
        "tokens_per_s_per_gpu": fastest.tokens_per_s_per_gpu,
        "tflops_per_gpu": fastest.tflops_per_gpu,
        "mfu": fastest.mfu,
        "tokens_per_s_per_gpu_at_max": largest.tokens_per_s_per_gpu,
        "peak_memory_gib_at_max": largest.peak_memory_gib,
    }


def _fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def _gib(v) -> str:
    return "none" if v is None else f"{v:g} GiB"


def markdown(result: dict) -> str:
    r = result
    lines = [
        f"# Micro-batch sweep: {r['model']} on {r['gpu']}", "",
        f"Command: `{r['command']}`", "",
        f"- date (UTC): {r['date']}; host: {r['host']}; device: {r['device']}",
        f"- torch {r['torch']}; commit {r['git_commit']}",
        f"- world size {r['world_size']} ({r['gpus_per_trial']} per node x {r['nodes']} nodes), "
        f"tensor parallel {r['tensor_parallel']}, sequence length {r['seq_length']} (padded)",
        f"- GPU memory cap: {_gib(r['memory_cap_gib'])}; CPU address-space limit per process: "
        f"{_gib(r['cpu_memory_limit_gib'])}; compile: {r['compile']}",
        f"- {r['warmup_steps']} warm-up steps dropped, median over {r['timed_steps']} timed steps",
        "", "## Per recompute policy", "",
        "| recompute | max micro batch | fastest micro batch | tokens/s/GPU | TFLOP/s/GPU | MFU |"
        " tokens/s/GPU at max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for policy, s in r["policies"].items():
        largest = _fmt(s["max_micro_batch_size"], "d")
        if s.get("max_is_search_limit"):
            largest = f">= {largest} (--max)"
        lines.append(
            f"| {policy} | {largest} | {_fmt(s['micro_batch_size'], 'd')}"
            f" | {_fmt(s.get('tokens_per_s_per_gpu'))} | {_fmt(s.get('tflops_per_gpu'), '.3g')}"
            f" | {_fmt(s.get('mfu'), '.1%')} | {_fmt(s.get('tokens_per_s_per_gpu_at_max'))} |")
    lines += ["", "## Trials (in the order run)", "",
              "| recompute | micro batch | fits | tokens/s/GPU | useful tokens/s/GPU | TFLOP/s/GPU |"
              " MFU | peak GiB | seconds |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for t in r["trials"]:
        lines.append(
            f"| {t['recompute']} | {t['micro_batch_size']} | {'yes' if t['fits'] else 'OOM'}"
            f" | {_fmt(t['tokens_per_s_per_gpu'])} | {_fmt(t['useful_tokens_per_s_per_gpu'])}"
            f" | {_fmt(t['tflops_per_gpu'], '.3g')} | {_fmt(t['mfu'], '.1%')}"
            f" | {_fmt(t['peak_memory_gib'], '.2f')} | {t['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, folder: Path, model: str) -> list[Path]:
    from benchmarks.plots import plot_memory, plot_throughput  # matplotlib only once there is data

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{model}.{ext}" for ext in ("json", "csv", "md")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in fields(Trial)])
        writer.writeheader()
        writer.writerows(result["trials"])
    paths[2].write_text(markdown(result))
    title = f"{model} on {result['gpu']}, world size {result['world_size']}"
    paths.append(plot_throughput(result["trials"], folder / f"{model}_throughput.png", title))
    paths.append(plot_memory(result["trials"], folder / f"{model}_memory.png", title,
                             result["memory_cap_gib"]))
    return paths


def table_row(result: dict, old_row: dict, source: str) -> dict:
    """The new values of a benchmark-table row, from the sweep's "none" policy."""
    s = result["policies"]["none"]
    if s.get("max_is_search_limit"):
        print(f"[sweep] note: --max {s['max_micro_batch_size']} itself fit; the table's "
              f"max_micro_batch_size is only a lower bound (sweep again with a larger --max)")
    row = dict(old_row)
    row.update(micro_batch_size=s["micro_batch_size"], tensor_parallel=result["tensor_parallel"],
               max_micro_batch_size=s["max_micro_batch_size"])
    if result["gpu"] != "cpu":  # CPU tables say gpus: 0
        row["gpus"] = result["world_size"]
    gbs = row.get("global_batch_size")
    if gbs is not None and gbs % s["micro_batch_size"]:
        print(f"[sweep] global_batch_size {gbs} is not a multiple of the new micro batch "
              f"{s['micro_batch_size']}: set to null (micro batch x data-parallel size)")
        row["global_batch_size"] = None
    date = result["date"][:10]
    row.update(measured=True, source=f"{source} (make sweep, {date})")
    columns = table_columns()
    if columns is None or "date" in columns:  # the launcher's schema rejects unknown columns
        row["date"] = date
    return row


def table_columns() -> set[str] | None:
    """The columns the launcher accepts in a table row (None: launcher not importable)."""
    try:
        from launchers.config import BenchmarkRow
    except ImportError:
        return None
    return set(BenchmarkRow.model_fields)


def update_table(path: Path, gpu: str, model: str, row: dict) -> None:
    """Replace (or add) the row `model` under `rows:` in a benchmark table, keeping the text,
    comments included, of everything else; a new table gets a short header."""
    if not path.exists():
        path.write_text(f"# Benchmark table: {gpu}, measured by `make sweep` (docs/sweep.md).\n"
                        f"gpu_type: {gpu}\nkind: {'cpu' if gpu == 'cpu' else 'gpu'}\n"
                        f"measured: true\nsource: make sweep\nrows:\n")
    text = path.read_text()
    before = yaml.safe_load(text) or {}
    block = yaml.safe_dump({model: row}, sort_keys=False, width=100)
    block = "".join(f"  {line}\n" for line in block.splitlines())
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    rows_at = next((i for i, ln in enumerate(lines) if re.match(r"rows:\s*(#.*)?$", ln)), None)
    if rows_at is None:
        lines += ["rows:\n", block]
    else:
        # The rows section runs until the next top-level key; a row until the next line indented
        # two spaces or less (blank lines and deeper comments belong to it).
        end = next((i for i in range(rows_at + 1, len(lines))
                    if lines[i].strip() and not lines[i].startswith(" ")
                    and not lines[i].startswith("#")), len(lines))
        start = next((i for i in range(rows_at + 1, end)
                      if re.match(rf"  {re.escape(model)}:\s*(#.*)?$", lines[i])), None)
        if start is None:
            while end > rows_at + 1 and not lines[end - 1].strip():
                end -= 1  # append after the last row, before trailing blank lines
            lines.insert(end, block)
        else:
            stop = start + 1
            while stop < end and (not lines[stop].strip() or lines[stop].startswith("   ")):
                stop += 1
            while stop > start + 1 and not lines[stop - 1].strip():
                stop -= 1  # keep the blank lines that separate it from what follows
            lines[start:stop] = [block]
    new_text = "".join(lines)
    after = yaml.safe_load(new_text)
    expected = {**before, "rows": {**(before.get("rows") or {}), model: row}}
    if after != expected:  # an unusual layout: fall back to a plain dump (comments are lost)
        print(f"[sweep] {path}: could not edit the row in place; rewriting the file without comments")
        new_text = yaml.safe_dump(expected, sort_keys=False, width=100)
    path.write_text(new_text)


# ------------------------------------------------------------------------------------ main


def run_sweep(args: argparse.Namespace) -> dict:
    preset = load_base(args)
    world = args.gpus_per_trial * args.nodes
    first = trial_config(preset, args, args.recompute[0], args.min)  # fail early on a bad config
    TrainerConfig.model_validate(first).data.check_files()
    device, is_gpu = detect_device()
    is_gpu = is_gpu and first["train"]["device"] != "cpu"  # train.device=cpu: CPU trials anyway
    gpu = args.gpu_name or (gpu_table_name(device) if is_gpu else "cpu")
    if args.cpu_memory_limit_gib and is_gpu:
        raise ValueError("--cpu-memory-limit-gib is for CPU trials: CUDA reserves far more address "
                         "space than any limit allows; cap GPU memory with --memory-cap-gib")
    if args.inside_allocation and "SLURM_JOB_ID" not in os.environ:
        raise ValueError("--inside-allocation needs a SLURM job (no SLURM_JOB_ID): run it in the "
                         "batch script of an allocation of --nodes nodes, see docs/sweep.md")
    work_dir = (args.work_dir / gpu / args.model).resolve()
    print(f"[sweep] {args.model} on {gpu} ({device}): world size {world}, micro batch "
          f"{args.min}..{args.max}, recompute {', '.join(args.recompute)}; trials in {work_dir}",
          flush=True)

    runner = Runner(args, preset, work_dir)
    start = args.min
    for policy in args.recompute:
        best = search(lambda m: runner(policy, m).fits, args.min, args.max, start)
        print(f"[sweep] {policy}: largest micro batch that fits: {best}", flush=True)
        start = best or args.min  # recompute only lowers memory: the next policy starts here

    policies = {p: summarize(runner.trials, p, args.max) for p in args.recompute}
    ref = args.recompute[0]
    best_config = None
    if policies[ref]["micro_batch_size"] is not None:
        best_config = trial_config(preset, args, ref, policies[ref]["micro_batch_size"])
    return {
        "model": args.model, "gpu": gpu,
        "command": shlex.join(["python", "-m", "benchmarks.sweep", *args.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(), "device": device, "torch": torch_version(),
        "git_commit": git_commit(),
        "world_size": world, "gpus_per_trial": args.gpus_per_trial, "nodes": args.nodes,
        "tensor_parallel": args.tp, "seq_length": first["model"]["seq_length"],
        "memory_cap_gib": args.memory_cap_gib, "cpu_memory_limit_gib": args.cpu_memory_limit_gib,
        "compile": first["train"]["compile"], "warmup_steps": args.warmup_steps, "timed_steps": args.steps,
        "inside_allocation": args.inside_allocation,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID") if args.inside_allocation else None,
        "search": {"min": args.min, "max": args.max},
        "policies": policies,
        "best": {"recompute": ref, "micro_batch_size": policies[ref]["micro_batch_size"],
                 "config": best_config},
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
        if "none" not in result["policies"] or result["policies"]["none"]["micro_batch_size"] is None:
            print("[sweep] --write-table needs a fitting micro batch with recompute 'none' (the "
                  "policy tables describe)", file=sys.stderr)
            return 1
        table = args.tables / f"{result['gpu']}.yaml"
        old = ((yaml.safe_load(table.read_text()) or {}).get("rows") or {}).get(args.model, {}) \
            if table.exists() else {}
        source = str(folder / f"{args.model}.json")
        update_table(table, result["gpu"], args.model, table_row(result, old or {}, source))
        print(f"[sweep] updated row {args.model} of {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
