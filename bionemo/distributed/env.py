"""The trainer's only view of the scheduler: who am I, how many are we, where is rank 0.

Read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) when present, else from SLURM's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), else a single process. The master address is
MASTER_ADDR when exported (the batch script does), else the first host of the allocation.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Mapping


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
        # A port derived from the job id keeps two jobs sharing a node from colliding.
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
