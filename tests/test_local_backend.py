"""The local backend with several ranks (launchers/backends/local.py): the run's exit code is the
one its ranks agreed on, signals reach the ranks, a failed rank does not leave the others waiting.
Real processes: the trainer itself (2 gloo ranks on CPU), and shell stubs for the failure paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bionemo import rundir
from launchers import record
from launchers.backends import local
from tests.test_resume import data_dir  # noqa: F401 -- the module's sample-data fixture

REPO = Path(__file__).resolve().parents[1]


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _saved(tmp_path: Path, python: Path, nproc: int) -> dict:
    return {
        "cluster": {
            "python": str(python),
            "workdir": str(tmp_path),
            "env": {},
            "gpus_per_node": 0,
            "tasks_per_node": nproc,
        },
        "job": {"nodes": 1},
        "trainer": {"train": {"stop_signal": "USR2"}},
    }


def _children(pid: int) -> dict[int, dict[str, str]]:
    """{pid: environment} of the direct children of `pid`."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if d.name.isdigit() and ppid == pid:
                env = (d / "environ").read_bytes().split(b"\0")
                out[int(d.name)] = dict(
                    e.decode(errors="replace").partition("=")[::2] for e in env if e
                )
        except (OSError, IndexError, ValueError):
            continue
    return out


def test_exit_code_is_the_ranks_agreement_else_the_first_failure():
    assert local.exit_code([75, 75]) == 75
    assert local.exit_code([0, 0]) == 0
    assert local.exit_code([124, -signal.SIGTERM]) == 124  # the watchdog fired, the rest stopped
    assert local.exit_code([75, 28]) == 28
    assert local.exit_code([-signal.SIGKILL, 1]) == 128 + signal.SIGKILL


def test_two_rank_run_saved_on_a_signal_exits_75(tmp_path, data_dir):
    """`debug --nproc 2`; SIGUSR2 to one rank only: the ranks agree, both save and exit 75, and
    so does the launcher (torchrun made it 1)."""
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launchers",
            "debug",
            "--model",
            "esm2_8m",
            "--nproc",
            "2",
            f"cluster.runs_root={tmp_path}/runs",
            "job.run=sig",
            f"trainer.data.train_clusters={data_dir}/train_clusters.parquet",
            f"trainer.data.valid_clusters={data_dir}/valid_clusters.parquet",
            f"trainer.data.database={data_dir}/proteins.sqlite",
            "trainer.model.num_layers=2",
            "trainer.model.seq_length=128",
            "trainer.train.micro_batch_size=4",
            "trainer.train.device=cpu",
            "trainer.train.limit_val_batches=0",
            "max_steps=400",
            "trainer.checkpoint.every_steps=1000",
            "cluster.env.BIONEMO_STEP_SLEEP=0.1",
            "cluster.env.OMP_NUM_THREADS=1",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_dir = tmp_path / "runs" / "debug" / "sig"
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / rundir.METRICS).is_file():  # step 5 logged: both ranks train
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
            time.sleep(0.2)
        ranks = _children(launcher.pid)
        assert sorted(e.get("RANK") for e in ranks.values()) == ["0", "1"], ranks
        assert {e.get("MASTER_ADDR") for e in ranks.values()} == {"127.0.0.1"}
        (rank1,) = [pid for pid, e in ranks.items() if e.get("RANK") == "1"]
        os.kill(rank1, signal.SIGUSR2)
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == rundir.REQUEUE_EXIT_CODE, out
    saved = rundir.latest_complete_step(run_dir)
    assert saved is not None and 5 <= saved < 400 and not rundir.is_finished(run_dir), out
    assert "[rank 0]" in out and "[rank 1]" in out and "stop requested" in out, out
    (attempt,) = record.load(run_dir)["attempts"]
    assert attempt["exit_code"] == rundir.REQUEUE_EXIT_CODE and attempt["latest_step"] == saved
    assert f"stopped and saved at step {saved}" in attempt["reason"]


def test_warning_signal_to_the_launcher_reaches_every_rank(tmp_path, capfd):
    stub = _exe(
        tmp_path / "python",
        """#!/bin/bash
# stands in for `python -m bionemo.train RUN_DIR`: saves (exits 75) on the warning signal
trap 'echo "rank $RANK saved"; exit 75' USR2
echo "rank $RANK of $WORLD_SIZE at $MASTER_ADDR:$MASTER_PORT"
while :; do sleep 0.1; done
""",
    )
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGUSR2))
    timer.start()
    try:
        rc = local.run(_saved(tmp_path, stub, 2), tmp_path / "run")
    finally:
        timer.cancel()
    out = capfd.readouterr().out
    assert rc == rundir.REQUEUE_EXIT_CODE, out
    assert "rank 0 saved" in out and "rank 1 saved" in out, out
    assert "rank 1 of 2 at 127.0.0.1:" in out
    (log,) = (tmp_path / "run" / "logs").glob("train-local-*.log")
    assert "rank 1 saved" in log.read_text()


def test_a_failed_rank_stops_the_others(tmp_path, monkeypatch, capfd):
    """Rank 1 crashes at once; rank 0 would wait for it forever and ignores SIGTERM: it is
    killed GRACE_S later, and the run reports rank 1's exit code."""
    monkeypatch.setattr(local, "GRACE_S", 1.0)
    stub = _exe(
        tmp_path / "python",
        """#!/bin/bash
[ "$RANK" = 1 ] && { echo "rank 1 crashes"; exit 3; }
trap '' TERM
while :; do sleep 0.1; done
""",
    )
    start = time.monotonic()
    rc = local.run(_saved(tmp_path, stub, 2), tmp_path / "run")
    assert rc == 3, capfd.readouterr().out
    assert time.monotonic() - start < 15
