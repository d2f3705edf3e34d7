"""Rendezvous faults on the bundled cluster (issue 13, defects 3, 7 and 12).

- A port the old scheme would pick (20000 + job id mod 20000) is held by another process: the
  run still trains, because the batch script picks a port that is free at job start.
- A rank fails before the rendezvous: srun ends the step (--kill-on-bad-exit) and the requeue
  policy decides within seconds, instead of the other rank waiting for minutes.
- Nothing listens beyond loopback: the SLURM daemons, and the ranks of a run (store and gloo).

Same job shape as the other backend tests (tests/integration/_runs.py: ESM-2 8M shrunk, 2 nodes x
1 rank, gloo).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import pytest

from bionemo import rundir
from bionemo.distributed.env import FAIL_BEFORE_RENDEZVOUS
from launchers import cluster, record
from tests.integration._runs import assert_finished, logs, shared, wait_for

DECISION_BOUND_S = 60  # from submission to the recorded requeue decision, start-up included


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory, request):
    return shared(slurm_cluster, tmp_path_factory, request)


# ------------------------------------------------------------------------------------ sockets


def _listening() -> dict[int, list[tuple[str, int]]]:
    """Socket inode -> [(local address, port)] of every listening TCP socket on this host."""
    out: dict[int, list[tuple[str, int]]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            addr_hex, port_hex = f[1].split(":")
            out.setdefault(int(f[9]), []).append((_address(addr_hex), int(port_hex, 16)))
    return out


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # /proc prints host-order words
    return socket.inet_ntop(socket.AF_INET6, words)


def _is_loopback(addr: str) -> bool:
    return (
        addr.startswith("127.")
        or addr in ("::1", "::ffff:127.0.0.1")
        or addr.startswith("::ffff:127.")
    )


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _trainer_pids(run_dir: Path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                # `python -m bionemo.train RUN`, not srun's own command line, which holds it too
                if argv[1:3] == [b"-m", b"bionemo.train"] and str(run_dir).encode() in argv:
                    pids.append(int(entry))
    return pids


def _trainer_listeners(run_dir: Path) -> dict[int, list[tuple[str, int]]] | None:
    """pid -> listening sockets of each trainer rank of the run, once both ranks listen."""
    table = _listening()
    found = {
        pid: [a for i in _socket_inodes(pid) for a in table.get(i, [])]
        for pid in _trainer_pids(run_dir)
    }
    return found if len(found) == 2 and all(found.values()) else None


def test_slurm_daemons_listen_on_loopback_only(slurm_cluster):
    if not cluster.hostname_is_loopback():
        # SLURM can only bind every address, or the one the host name resolves to: here that is
        # not loopback, so the documented fallback is to leave binding alone (docs/local-cluster.md)
        conf = (slurm_cluster.dir / "etc" / "slurm.conf").read_text()
        assert "NoInAddrAny" not in conf
        return
    ports = {cluster.CTLD_PORT, *(cluster.SLURMD_BASE_PORT + i for i in range(len(cluster.NODES)))}
    bound = [a for socks in _listening().values() for a in socks if a[1] in ports]
    assert {p for _, p in bound} == ports, bound
    assert all(_is_loopback(addr) for addr, _ in bound), bound


# ------------------------------------------------------------------------------------ runs


def test_old_schemes_port_taken_the_run_trains_and_listens_on_loopback(runs, slurm_cluster):
    run_dir, job_id = runs.submit(
        "sbatch",
        "port-taken",
        "max_steps=8",
        "trainer.checkpoint.every_steps=4",
        "job.hold=true",
        "cluster.env.BIONEMO_STEP_SLEEP=0.5",
        experiment="rank-faults",
    )
    holder = socket.socket()
    with contextlib.suppress(OSError):  # taken already: the clash is there either way
        holder.bind(("0.0.0.0", 20000 + int(job_id) % 20000))
        holder.listen()
    try:
        slurm_cluster.run(["scontrol", "release", job_id], check=True)
        listeners = wait_for(
            lambda: _trainer_listeners(run_dir), 90, "both ranks listening", run_dir
        )
        rec = runs.wait_final(job_id, timeout=120)
    finally:
        holder.close()
    assert rec["JobState"] == "COMPLETED", logs(run_dir)
    assert_finished(run_dir, 8)
    # the store (rank 0) and gloo's pairs (every rank): loopback only
    for pid, socks in listeners.items():
        assert all(_is_loopback(addr) for addr, _ in socks), (pid, socks)


def test_a_rank_that_dies_before_the_rendezvous_ends_the_step_and_the_policy_decides(
    runs, slurm_cluster
):
    t0 = time.monotonic()
    run_dir, job_id = runs.submit(
        "sbatch",
        "dead-rank",
        "max_steps=8",
        f"cluster.env.{FAIL_BEFORE_RENDEZVOUS}=1",
        experiment="rank-faults",
    )
    try:
        attempt = wait_for(
            lambda: record.load(run_dir).get("attempts"),
            DECISION_BOUND_S,
            "the requeue decision after rank 1 failed",
            run_dir,
        )[0]
    finally:
        runs.releaser.jobs.discard(job_id)
        slurm_cluster.cancel(job_id)
    took = time.monotonic() - t0
    assert attempt["outcome"] == "crashed" and attempt["decision"] == "requeue", attempt
    assert attempt["exit_code"] not in (0, rundir.REQUEUE_EXIT_CODE), attempt
    assert f"{FAIL_BEFORE_RENDEZVOUS}=1: rank 1 fails" in logs(run_dir, tail=None)
    assert took < DECISION_BOUND_S, took


def test_a_rank_alone_gives_up_on_the_rendezvous_after_the_timeout():
    """No kill from srun (e.g. torchrun, or a rank whose peer never started): the store's connect
    timeout (dist_timeout_s, at most RENDEZVOUS_TIMEOUT_S) ends the wait."""
    import subprocess
    import sys

    with socket.socket() as s:  # a port where nobody serves the store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from bionemo.distributed.env import DistEnv, rendezvous_store\n"
        "rendezvous_store(DistEnv.from_environ('USR2'), 1)\n"
    )
    env = {
        **os.environ,
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and "timeout" in out.stderr.lower(), out.stderr[-2000:]
    assert time.monotonic() - t0 < 30
