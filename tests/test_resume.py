"""Exact resume: real processes, real signals, real files (CPU, gloo)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bionemo import rundir
from bionemo.config import REQUEUE_EXIT_CODE

MAX_STEPS = 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bionemo.data.sample",
            "--out",
            str(out),
            "--clusters",
            "300",
            "--seed",
            "3",
        ],
        check=True,
    )
    return out


def make_run(path: Path, data_dir: Path, **train) -> Path:
    cfg = {
        "trainer": {
            "model": {
                "name": "tiny",
                "num_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "ffn_hidden_size": 128,
                "seq_length": 64,
            },
            "data": {
                "train_clusters": str(data_dir / "train_clusters.parquet"),
                "valid_clusters": str(data_dir / "valid_clusters.parquet"),
                "database": str(data_dir / "proteins.sqlite"),
            },
            "optim": {"warmup_steps": 5, "lr": 1e-3},
            "train": {
                "micro_batch_size": 4,
                "max_steps": MAX_STEPS,
                "log_every": 1,
                "val_every": 20,
                "precision": "fp32",
                "device": "cpu",
                **train,
            },
            "checkpoint": {"every_steps": 10, "keep_last": 2},
        }
    }
    path.mkdir(parents=True)
    (path / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, world: int, **extra_env) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra_env}
        for k in [k for k in env if k.startswith("SLURM_")]:
            del env[k]
        if world > 1:
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        log = open(run_dir / f"rank{rank}.log", "a")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bionemo.train", str(run_dir)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def wait_all(procs, timeout=300) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / rundir.METRICS).read_text().splitlines()
    records = [json.loads(line) for line in lines if line]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), "metrics.jsonl holds a step twice"
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def final_state(run_dir: Path, tmp: Path) -> dict:
    out = tmp / f"{run_dir.name}.pt"
    dcp_to_torch_save(rundir.step_dir(run_dir, MAX_STEPS), out)
    return torch.load(out, weights_only=False)


def assert_bitwise_equal(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"values differ at {where}: {a} != {b}"


def test_signal_stop_and_restart_is_bitwise_exact(tmp_path, data_dir):
    ref = make_run(tmp_path / "uninterrupted", data_dir)
    assert wait_all(launch(ref, world=2)) == [0, 0]

    run = make_run(tmp_path / "stopped", data_dir)
    stop_at = random.Random(time.time_ns()).randint(3, MAX_STEPS - 8)
    print(f"stopping after step {stop_at}")
    procs = launch(run, world=2, BIONEMO_STEP_SLEEP="0.2")
    deadline = time.time() + 240
    while time.time() < deadline:
        if (run / rundir.METRICS).exists() and max(train_losses(run), default=0) >= stop_at:
            break
        assert all(p.poll() is None for p in procs), "training ended before the signal"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR2)  # one rank only: the ranks must agree among themselves
    assert wait_all(procs) == [REQUEUE_EXIT_CODE] * 2
    saved = rundir.latest_complete_step(run)
    assert stop_at <= saved < MAX_STEPS
    assert not rundir.is_finished(run)

    assert wait_all(launch(run, world=2)) == [0, 0]  # new processes resume from the checkpoint
    # verified with the checksums each rank made of its share while its engine was built
    assert "with the checksums made while the engine was built" in (run / "rank0.log").read_text()
    assert rundir.is_finished(run)
    assert train_losses(run) == train_losses(ref)
    assert sorted(train_losses(run)) == list(range(1, MAX_STEPS + 1))
    assert_bitwise_equal(final_state(run, tmp_path), final_state(ref, tmp_path))


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, data_dir):
    ref = make_run(tmp_path / "uninterrupted", data_dir)
    assert wait_all(launch(ref, world=1)) == [0]

    run = make_run(tmp_path / "killed", data_dir)
    assert wait_all(launch(run, world=1, BIONEMO_KILL_DURING_SAVE="20")) == [-signal.SIGKILL]
    steps, incomplete = rundir.checkpoint_steps(run)
    assert steps == [10] and [d.name for d in incomplete] == ["step-00000020.partial"]

    assert wait_all(launch(run, world=1)) == [0]
    assert "ignoring incomplete checkpoint" in (run / "rank0.log").read_text()
    assert "resumed from" in (run / "rank0.log").read_text()
    assert train_losses(run) == train_losses(ref)
    assert_bitwise_equal(final_state(run, tmp_path), final_state(ref, tmp_path))


def test_finished_run_does_not_train_again(tmp_path, data_dir):
    run = make_run(tmp_path / "done", data_dir, max_steps=3)
    (run / rundir.FINISHED).write_text("3\n")
    assert wait_all(launch(run, world=1)) == [0]
    assert not (run / rundir.METRICS).exists()


def test_warning_signal_during_startup_is_a_stop_request(tmp_path, data_dir):
    run = make_run(tmp_path / "early", data_dir)
    (proc,) = launch(run, world=1)
    time.sleep(1.5)  # handlers are installed before torch's import, which takes longer than this
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=120) == REQUEUE_EXIT_CODE
    assert rundir.latest_complete_step(run) == 1  # stopped after the first step, and saved
