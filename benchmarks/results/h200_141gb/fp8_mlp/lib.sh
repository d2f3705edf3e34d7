# Sourced by run.sh, run2.sh and run3.sh here (one device call each, from the repository root,
# with OUT, BUDGET_S and CALL set): the call's setup and its budgeted steps.
#   run NAME CAP_S COMMAND...          a command, at most CAP_S seconds and what the budget leaves
#   sweep NAME MIN_LEFT SWEEP-ARGS...  `make sweep` on this GPU if MIN_LEFT seconds are left
#   finish                             OUT/results.tar.gz (this call's results), OUT/trials.tar.gz
set -u
touch /tmp/t0; T0=$(date +%s); DEADLINE=$((T0 + BUDGET_S)); LOG=$OUT/log.txt
R=benchmarks/results/h200_141gb/fp8_mlp/$CALL
benchmarks/slurm_gpu/prepare.sh site >>"$LOG" 2>&1 || exit 1
export PYTHONPATH=/tmp/bionemo-slurm-gpu/site:$PWD PYTHONUNBUFFERED=1
{ date -u; cat COMMIT_STAMP; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, torchao, triton; print('torch', torch.__version__, 'torchao', torchao.__version__, 'triton', triton.__version__)"; } >>"$LOG" 2>&1

left() { echo $((DEADLINE - $(date +%s))); }
run() {
    local name=$1 cap=$2; shift 2
    if [ "$(left)" -lt 40 ]; then echo "=== $name: skipped (budget)" >>"$LOG"; return; fi
    echo "=== $name: $*" >>"$LOG"
    timeout "$(( $(left) < cap ? $(left) : cap ))" "$@" >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}
sweep() {
    local name=$1 need=$2; shift 2
    if [ "$(left)" -lt "$need" ]; then echo "=== $name: skipped (budget)" >>"$LOG"; return; fi
    echo "=== $name: python -m launchers sweep $*" >>"$LOG"
    timeout "$(left)" python3 -m launchers sweep --backend local --cluster local_gpu \
        --recompute none --compile --gpu-name h200_141gb \
        --trial-timeout "$(left)" "$@" cluster.runs_root=/tmp/runs \
        "cluster.env.PYTHONPATH=$PYTHONPATH" >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}
finish() {
    tar czf "$OUT/results.tar.gz" $(find "$R" -newer /tmp/t0 -type f) 2>>"$LOG"
    tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
    echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
}
