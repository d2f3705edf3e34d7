"""The trainer's only view of the scheduler: who am I, how many are we, where is rank 0.

Read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) when present, else from SLURM's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), else a single process. The master address is
MASTER_ADDR when exported (the batch script does), else the first host of the allocation.
`rendezvous_store` builds the process group's store from it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

log = logging.getLogger("bionemo.distributed")

# Connecting to the store: srun starts every rank within seconds, a container on a cold node may
# take a few minutes; a rank that never comes is then an error, not a wait of dist_timeout_s.
RENDEZVOUS_TIMEOUT_S = 300
# Tests set this to a rank: that rank fails before it joins the rendezvous (a rank that dies at
# start-up, e.g. on a bad node).
FAIL_BEFORE_RENDEZVOUS = "BIONEMO_FAIL_BEFORE_RENDEZVOUS"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    stop_signal: str  # the scheduler's warning signal (SIGTERM is always handled as well)
    job_id: str | None = None
    restart_count: int = 0
    launcher: str = "single"  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls, stop_signal: str, environ: Mapping[str, str] | None = None) -> "DistEnv":
        e = os.environ if environ is None else environ
        job_id = e.get("SLURM_JOB_ID")
        restarts = int(e.get("SLURM_RESTART_COUNT", "0") or 0)
        if "RANK" in e and "WORLD_SIZE" in e:
            launcher = "torchrun"
            rank, world, local = int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0))
        elif "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
            launcher = "slurm"
            rank, world = int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"])
            local = int(e.get("SLURM_LOCALID", 0))
        else:
            launcher, rank, world, local = "single", 0, 1, 0
        addr = e.get("MASTER_ADDR") or (_first_slurm_host(e) if launcher == "slurm" else None)
        # Only for ranks started by hand: the batch scripts export a port that was free on the
        # master node at job start (templates/slurm/_environment.j2).
        default_port = 20000 + int(job_id) % 20000 if job_id and job_id.isdigit() else 29500
        return cls(
            rank=rank,
            world_size=world,
            local_rank=local,
            master_addr=addr or "127.0.0.1",
            master_port=int(e.get("MASTER_PORT", default_port)),
            stop_signal=stop_signal,
            job_id=job_id,
            restart_count=restarts,
            launcher=launcher,
        )


def _first_slurm_host(e: Mapping[str, str]) -> str | None:
    nodelist = e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST")
    if not nodelist:
        return None
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[0]


def rendezvous_store(env: DistEnv, timeout_s: float):
    """The process group's store: rank 0 serves it at master_addr:master_port, the others connect.

    Connecting waits at most RENDEZVOUS_TIMEOUT_S (or timeout_s if shorter); afterwards every
    store operation, and so the process group's set-up, waits at most timeout_s. torch's store
    server listens on every interface whatever address it is given, so on a loopback master
    address (the bundled cluster, a single machine) rank 0 binds that address itself and hands
    the socket over: the unauthenticated store is then not reachable from other hosts. Under
    torchrun the agent serves the store and every rank is a client, as torch does it.
    """
    from datetime import timedelta

    import torch.distributed as dist

    if os.environ.get(FAIL_BEFORE_RENDEZVOUS) == str(env.rank):
        raise RuntimeError(
            f"{FAIL_BEFORE_RENDEZVOUS}={env.rank}: rank {env.rank} fails before the rendezvous"
        )
    serve = env.is_main and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    listen_fd = _loopback_listener(env.master_addr, env.master_port) if serve else None
    if serve:
        log.info("rendezvous store on %s:%d", env.master_addr, env.master_port)
    store = dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        is_master=serve,
        timeout=timedelta(seconds=min(timeout_s, RENDEZVOUS_TIMEOUT_S)),
        master_listen_fd=listen_fd,
    )
    store.set_timeout(timedelta(seconds=timeout_s))
    return store


def _loopback_listener(addr: str, port: int) -> int | None:
    """A listening socket on (addr, port) when addr is a loopback IP, as a file descriptor that the
    store takes over; None otherwise (the store binds every interface, as multi-node runs need)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if not ip.is_loopback:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        sock = socket.create_server((addr, port), family=family, backlog=socket.SOMAXCONN)
    except OSError as e:
        raise RuntimeError(
            f"rendezvous: cannot listen on {addr}:{port}: {e.strerror}; "
            "another process holds the port (MASTER_PORT)"
        ) from None
    return sock.detach()
