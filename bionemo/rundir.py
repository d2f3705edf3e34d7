"""The run directory: the one place the launcher and the trainer meet (torch-free).

    runs/<experiment>/<run>/
      config.yaml          resolved configuration (sections job, cluster, trainer)
      train.sbatch         rendered batch script (SLURM backends)
      submission.json      the launcher's record: backend, job ids, attempts and decisions
      logs/                scheduler and trainer output
      metrics.jsonl        one JSON object per logged step / validation
      checkpoints/step-00000040/   complete only once its COMPLETE marker exists
      finished             written by the trainer after the last step; never requeue after it
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.yaml"
SCRIPT = "train.sbatch"
SUBMISSION = "submission.json"
LOGS = "logs"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINISHED = "finished"
COMPLETE = "COMPLETE"  # marker inside a checkpoint folder, written last, after every rank finished

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def checkpoint_steps(run_dir: Path) -> tuple[list[int], list[Path]]:
    """(steps of complete checkpoints ascending, folders that look like checkpoints but are not)."""
    root = Path(run_dir) / CHECKPOINTS
    complete, incomplete = [], []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if not d.is_dir() or not m:
                if d.is_dir():
                    incomplete.append(d)  # e.g. step-00000040.partial: a save that never finished
                continue
            (complete.append(int(m.group(1))) if (d / COMPLETE).is_file() else incomplete.append(d))
    return sorted(complete), incomplete


def latest_complete_step(run_dir: Path) -> int | None:
    steps, _ = checkpoint_steps(run_dir)
    return steps[-1] if steps else None


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / FINISHED).is_file()
