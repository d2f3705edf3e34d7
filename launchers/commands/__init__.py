"""The CLI's commands, one module per group (launchers/cli.py parses and dispatches):
`submit` (render, submit, recipe, sweep, debug, resume) and `inspect` (status, logs, cancel,
list, plot). What both use is here: how they print, and how a run directory is found and read.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bionemo import rundir
from launchers.config import ConfigError, load_resolved
from launchers.paths import REPO_ROOT


def echo(text: str = "") -> None:
    print(text, flush=True)


def error(text: str) -> None:
    for line in str(text).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr, flush=True)


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def find_run(run: str | None) -> Path:
    """The run directory RUN names (a path, or relative to runs/), or the newest under runs/."""
    if run:
        for candidate in (Path(run), REPO_ROOT / "runs" / run):
            if (candidate / rundir.CONFIG).is_file():
                return candidate.resolve()
        raise ConfigError(
            "command line",
            "RUN",
            f"{run} is not a run directory (no config.yaml)",
            "pass the directory `submit` printed, e.g. runs/esm2/<run>",
        )
    runs = sorted(
        (REPO_ROOT / "runs").glob(f"*/*/{rundir.CONFIG}"), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise ConfigError("command line", "RUN", "no runs under runs/", "pass RUN=<run directory>")
    return runs[-1].parent


def load_saved(run_dir: Path) -> dict:
    """The run's resolved config.yaml, as a plain dict."""
    return load_resolved(run_dir / rundir.CONFIG)
