"""`python -m launchers ...` and the `bionemo-hpc` command (pyproject.toml): launchers/cli.py."""

import sys
import time


def run() -> int:
    t0 = time.perf_counter()
    # imported here so that submit's recorded timings (submission.json) include the imports
    from launchers.cli import main

    return main(t0=t0)


if __name__ == "__main__":
    sys.exit(run())
