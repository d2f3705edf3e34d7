"""The micro-batch sweep: the largest micro batch that trains, and what every size tried delivers.

`python -m launchers sweep` (and `make sweep`, with or without BACKEND) resolves a run whose
config.yaml holds a validated `sweep` section, and a backend starts the orchestrator once:

    search        the search (double, then bisect) and the per-policy summary; pure
    trials        one trial: its trainer config, its processes (here or an srun step), its figures
    results       the result files and the benchmark-table row of --write-table
    orchestrator  the process a backend starts (`python -m launchers.sweeping`): runs the search

A trial is a short run of the real trainer, nothing else: `python -m bionemo.train <dir>` on
fresh processes, read back from its metrics.jsonl. Nothing here imports torch (docs/sweep.md).
"""

MODULE = "launchers.sweeping"  # `python -m MODULE` runs the orchestrator (launchers/sweep.py)
