"""One trial: its trainer config, its processes (here, or one srun step of the allocation) and
the figures read back from its metrics.jsonl. Exit code 12 (OOM_EXIT_CODE) means "did not fit", a
finding; any other failure stops the sweep with that trial's log tail.

This process never imports torch: a CUDA context here would hold GPU memory the trials need.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

import yaml

from bionemo import rundir
from bionemo.config import OOM_EXIT_CODE, TrainerConfig, dump_trainer_config
from launchers.paths import CONFIGS, REPO_ROOT
from launchers.sweeping.search import SweepError, Trial, describe, variant_label

# Substring of the device name (upper case) -> benchmark table name (configs/benchmarks/<name>.yaml).
GPU_TABLES = {"H200": "h200_141gb", "H100": "h100_80gb", "A100": "a100_80gb"}
# After one rank fails, the others may be blocked in a collective that never completes (NCCL waits
# 10 minutes by default); give them this long to exit by themselves, then kill them.
FAILURE_GRACE_S = 30
LOG_TAIL_LINES = 30


# ------------------------------------------------------------------------------------ configuration


def load_base(args: argparse.Namespace) -> dict:
    """The trainer section trials start from: --base-config's (the run's resolved config.yaml),
    else the model preset's (benchmark scripts that call this without a run)."""
    if args.base_config is None:
        return load_preset(args.model)
    raw = yaml.safe_load(args.base_config.read_text()) or {}
    if not isinstance(raw.get("trainer"), dict):
        raise ValueError(f"{args.base_config} has no trainer section")
    return raw["trainer"]


def load_preset(model: str) -> dict:
    path = CONFIGS / "models" / f"{model}.yaml"
    if not path.is_file():
        known = sorted(q.stem for q in path.parent.glob("*.yaml"))
        raise ValueError(f"no model preset {path}; presets: {', '.join(known)}")
    raw = yaml.safe_load(path.read_text()) or {}
    return raw.get("trainer", raw)


def set_dotted(cfg: dict, key: str, value) -> None:
    """cfg['a']['b'] = value for key 'a.b' (a leading 'trainer.' is accepted and dropped): the
    trial's own settings; user overrides went through the launcher's resolution."""
    parts = key.removeprefix("trainer.").split(".")
    for part in parts[:-1]:
        cfg = cfg.setdefault(part, {})
        if not isinstance(cfg, dict):
            raise ValueError(f"{key}: {part} is not a section")
    cfg[parts[-1]] = value


def absolute_data_paths(cfg: TrainerConfig) -> TrainerConfig:
    """Data paths relative to the repository (as `make` runs), made absolute in place."""
    for name, value in cfg.data:
        if isinstance(value, Path) and not value.is_absolute():
            setattr(cfg.data, name, REPO_ROOT / value)
    return cfg


def trial_config(
    preset: dict,
    args: argparse.Namespace,
    policy: str,
    micro_batch: int,
    variant: tuple[str, str] | None = None,
) -> dict:
    """The validated trainer section of one trial: the base config (the run's resolved trainer
    section, user overrides included) < the sweep's own settings. variant: (data-parallel
    strategy, FP8 recipe) searched by the sweep; None keeps the base config's."""
    cfg = json.loads(json.dumps(preset))  # deep copy
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
    if variant is not None:
        own["parallel.data_parallel"], own["train.fp8"] = variant
    for key, value in own.items():
        set_dotted(cfg, key, value)
    validated = absolute_data_paths(TrainerConfig.model_validate(cfg))
    validated.check_parallel(args.gpus_per_trial * args.nodes)
    return dump_trainer_config(validated)


def prepare_data(trainer: dict) -> None:
    """Build the clusters' shared index (bionemo/data/cluster_index.py) here, once, before any
    trial: the trial that built it would count the build's worker threads and buffers in its
    measured peak memory, and under an address-space limit could fail for them."""
    cfg = TrainerConfig.model_validate(trainer)
    if cfg.model.family != "esm2" or cfg.task.fine_tuning or cfg.model.plugin:
        return
    from bionemo.data.cluster_index import ClusterIndex  # numpy and pyarrow, no torch

    for key, path, column in (
        ("data.train_clusters", cfg.data.train_clusters, "ur90_id"),
        ("data.valid_clusters", cfg.data.valid_clusters, "ur50_id"),
    ):
        if path is not None:
            ClusterIndex(Path(path), column, key).open()


# ------------------------------------------------------------------------------------ environment


def gpu_table_name(device_name: str) -> str:
    upper = device_name.upper()
    table = next((v for k, v in GPU_TABLES.items() if k in upper), None)
    return table or re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


def detect_device() -> tuple[str, bool]:
    """(device name, is a GPU), from nvidia-smi so that this process creates no CUDA context."""
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
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


def torch_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def free_port(host: str = "") -> int:
    """A port free now on `host` ("": every address; the local backend asks for loopback)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def first_node_address() -> str:
    """Address of the allocation's first node (srun puts rank 0 there): its NodeAddr."""
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    node = subprocess.run(
        ["scontrol", "show", "node", "-o", hosts[0]], capture_output=True, text=True
    ).stdout
    match = re.search(r"\bNodeAddr=(\S+)", node)
    return match.group(1) if match else hosts[0]


def trial_environment(args: argparse.Namespace) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")
    }
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


def launch_local(
    run_dir: Path,
    world: int,
    env: dict,
    limit_bytes: int | None,
    timeout: float,
    python: str = sys.executable,
) -> tuple[list[int | None], bool]:
    """One process per rank on this machine; returns (exit codes, timed out)."""
    port = free_port()
    procs = []
    try:
        for rank in range(world):
            # Set even for world 1, so that SLURM variables of a surrounding job are not read.
            rank_env = {
                **env,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            with open(run_dir / f"rank{rank}.log", "w") as log:
                procs.append(
                    subprocess.Popen(
                        [python, "-m", "bionemo.train", str(run_dir)],
                        cwd=REPO_ROOT,
                        env=rank_env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        preexec_fn=_address_space_limit(limit_bytes),
                    )
                )
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
_SRUN_TASK = (
    'echo "[sweep] rank $SLURM_PROCID of $SLURM_NTASKS on $(hostname) '
    '(node $SLURMD_NODENAME, step $SLURM_JOB_ID.$SLURM_STEP_ID)"; '
    '{limit}"$1" -m bionemo.train "$0"; rc=$?; '
    'echo $rc > "$0/rank$SLURM_PROCID.rc"; exit $rc'
)


def launch_srun(
    run_dir: Path,
    nodes: int,
    per_node: int,
    env: dict,
    limit_bytes: int | None,
    timeout: float,
    python: str = sys.executable,
    srun_args: list[str] = (),
) -> tuple[list[int | None], bool]:
    """One srun job step in the current allocation; returns (exit codes, timed out).
    srun_args: the launcher's flags for the step (CPUs per task, pyxis, the profile's own;
    --overlap when the sweep itself runs in a step, see docs/sweep.md)."""
    world = nodes * per_node
    env = {**env, "MASTER_PORT": str(free_port())}  # the batch script runs on the first node
    env.setdefault("MASTER_ADDR", first_node_address())
    limit = f"ulimit -v {limit_bytes // 1024}; " if limit_bytes else ""  # ulimit -v is in KiB
    cmd = [
        "srun",
        f"--nodes={nodes}",
        f"--ntasks={world}",
        f"--ntasks-per-node={per_node}",
        "--kill-on-bad-exit=0",
        f"--wait={FAILURE_GRACE_S}",
        f"--output={run_dir}/rank%t.log",
        *srun_args,
        "bash",
        "-c",
        _SRUN_TASK.format(limit=limit),
        str(run_dir),
        python,
    ]
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

    def __call__(
        self, policy: str, micro_batch: int, variant: tuple[str, str] | None = None
    ) -> Trial:
        """variant: (parallel.data_parallel, train.fp8) of the trial; None: the base config's."""
        if variant is None:
            base = trial_config(self.preset, self.args, policy, micro_batch)
            variant = (base["parallel"]["data_parallel"], base["train"]["fp8"])
        done = next(
            (
                t
                for t in self.trials
                if (t.recompute, t.micro_batch_size, (t.data_parallel, t.fp8))
                == (policy, micro_batch, variant)
            ),
            None,
        )
        if done is not None:
            return done
        a = self.args
        label = variant_label(*variant)
        # e.g. ddp-none-mbs00016, fsdp-fp8_tensorwise-selective-mbs00024: a name for any filesystem
        run_dir = (
            self.work_dir
            / f"{label.replace('+', '-').replace(':', '_')}-{policy}-mbs{micro_batch:05d}"
        )
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cfg = trial_config(self.preset, a, policy, micro_batch, variant)
        (run_dir / rundir.CONFIG).write_text(yaml.safe_dump({"trainer": cfg}, sort_keys=False))
        print(f"[sweep] {label} {policy:9s} micro batch {micro_batch:4d}: ", end="", flush=True)
        t0 = time.monotonic()
        if a.inside_allocation:
            codes, timed_out = launch_srun(
                run_dir,
                a.nodes,
                a.gpus_per_trial,
                self.env,
                self.limit_bytes,
                a.trial_timeout,
                a.python,
                a.srun_args,
            )
        else:
            codes, timed_out = launch_local(
                run_dir, self.world, self.env, self.limit_bytes, a.trial_timeout, a.python
            )
        seconds = time.monotonic() - t0
        trial = Trial(
            policy,
            micro_batch,
            fits=False,
            seconds=round(seconds, 2),
            run_dir=str(run_dir),
            data_parallel=variant[0],
            fp8=variant[1],
        )
        if OOM_EXIT_CODE in codes:  # one rank out of memory is enough; the others may have crashed
            print(f"out of memory ({seconds:.0f} s)", flush=True)
        elif not timed_out and all(c == 0 for c in codes):
            trial.fits = True
            for key, value in read_metrics(run_dir, a.warmup_steps).items():
                setattr(trial, key, value)
            print(describe(trial), flush=True)
        else:
            print("failed", flush=True)
            why = (
                f"did not finish within {a.trial_timeout:.0f} s"
                if timed_out
                else f"exit codes per rank {codes} (None: killed or unknown)"
            )
            logs = sorted(run_dir.glob("rank*.log")) + sorted(run_dir.glob("srun.log"))
            raise SweepError(
                f"trial {label} {policy} micro batch {micro_batch} {why}; the sweep stops "
                f"here.\n" + "\n".join(_tail(p) for p in logs)
            )
        self.trials.append(trial)
        return trial
