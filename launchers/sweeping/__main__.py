"""`python -m launchers.sweeping`: the sweep's orchestrator (launchers/sweeping/orchestrator.py)."""

import sys

from launchers.sweeping.orchestrator import main

sys.exit(main())
