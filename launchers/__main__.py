"""`python -m launchers ...` (see launchers/cli.py)."""

import gc
import os
import sys
import time

_t0 = time.perf_counter()  # before the imports: submit's recorded timings include them

# A command lives a fifth of a second and frees nothing worth collecting; the collector's passes
# over the ~10^5 objects that importing pydantic and building its models allocate cost ~8 ms of
# it. Commands that wait (debug, logs -f) only wait on a child process.
gc.disable()

# The launcher uses no pydantic plugins; without this, building the first model scans the metadata
# of every installed package for plugin entry points (30 ms on a quiet machine, 100+ under load).
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from launchers import _startup  # noqa: E402

_startup.skip_plugin_loader()

from launchers.cli import main  # noqa: E402

_startup.exit_now(main(t0=_t0))
