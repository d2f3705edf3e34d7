"""Compatibility shim: `python -m benchmarks.sweep ...` is `python -m launchers sweep --backend local ...`.

The micro-batch sweep is a launcher feature (launchers/sweeping/, docs/sweep.md). This module
keeps the commands recorded in benchmarks/results working: it translates the old flags and hands
them to the launcher, so the sweep goes through the launcher's config layers and checks, with one
grammar and one override parser:

    --set KEY=VALUE ...   the same (trainer overrides)
    --work-dir DIR        cluster.runs_root=DIR (trials in DIR/<experiment>/<run>/trials/)
    --python PY           cluster.python=PY
    every other flag      the same flag of `python -m launchers sweep`

Without --cluster the launcher's default profile applies; without --nodes, one node. A command
line of the orchestrator itself (--inside-allocation or --base-config, as in the batch scripts
of sweeps submitted before the move) goes to `python -m launchers.sweeping` unchanged.
"""

from __future__ import annotations

import sys

# Helpers other benchmark scripts import from here (benchmarks/megatron_check.py, resume_probe.py).
from launchers.sweeping.trials import (  # noqa: F401
    absolute_data_paths,
    free_port,
    load_preset,
    set_dotted,
)

# old flag -> the launcher key it now sets
_AS_KEYS = {"--work-dir": "cluster.runs_root", "--python": "cluster.python"}


def launcher_words(argv: list[str]) -> list[str]:
    """The `python -m launchers` words for an old `python -m benchmarks.sweep` command line."""
    words, keys = ["sweep", "--backend", "local"], []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in _AS_KEYS:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            keys.append(f"{_AS_KEYS[flag]}={value}")
        else:
            words.append(argv[i])
        i += 1
    return words + keys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(w.split("=")[0] in ("--inside-allocation", "--base-config") for w in argv):
        from launchers.sweeping.orchestrator import main as orchestrate

        return orchestrate(argv)
    from launchers.cli import main as launch

    return launch(launcher_words(argv))


if __name__ == "__main__":
    sys.exit(main())
