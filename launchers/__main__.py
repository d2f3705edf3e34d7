"""`python -m launchers ...` (see launchers/cli.py)."""

import os
import sys
import time

_t0 = time.perf_counter()  # before the imports: submit's recorded timings include them

# The launcher uses no pydantic plugins; without this, building the first model scans the metadata
# of every installed package for plugin entry points (30 ms on a quiet machine, 100+ under load),
# a quarter of `submit`'s own time.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from launchers.cli import main  # noqa: E402

sys.exit(main(t0=_t0))
