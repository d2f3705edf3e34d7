"""`python -m launchers ...` (see launchers/cli.py)."""

import sys
import time

_t0 = time.perf_counter()  # before the imports: submit's recorded timings include them

from launchers.cli import main  # noqa: E402

sys.exit(main(t0=_t0))
