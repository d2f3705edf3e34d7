#!/bin/bash
# A `python` for the cluster profile (cluster.python=benchmarks/slurm_gpu/timed_python.sh): the
# trainer (`-m bionemo.train RUN_DIR`) runs through timed_train.py, which stamps its start-up
# phases; anything else the batch script runs with it (e.g. `-c` for a free port) is plain python3.
if [ "${1:-}" = -m ] && [ "${2:-}" = bionemo.train ]; then
    echo "[timing] $(date +%s.%N) process start" >&2  # before the interpreter loads
    exec python3 "$(dirname "$0")/timed_train.py" "$@"
fi
exec python3 "$@"
