#!/usr/bin/env bash
# The second device call behind README.md here (one nvidia-h200), from the repository root,
# carrying data/sample, .whl/all (pydantic and its dependencies, torchao 0.17.0) and COMMIT_STAMP
# (`make stamp`):
#     BUDGET_S=560 bash benchmarks/results/h200_141gb/levers/run2.sh "$OUT"
# with bionemo.distributed.parallel.tune_generated_kernels() (inductor's max_autotune_pointwise),
# on in the trainer from this call on:
# 1. the trainer (one sweep trial each, full models): ESM-2 3B bf16 at micro batch 34 (the H200
#    table's bf16 best) and FP8 tensorwise at 56 (the table's row); ESM-2 650M at 99 (its row), to
#    show no regression there;
# 2. the step harness on the 3B's shape with 8 layers at micro batch 32: two more reduction
#    code-generation options (cooperative reductions, multi-kernel), FP8 and bf16, against FP8
#    with the tuning alone (same call). Writes OUT/log.txt, OUT/rows.jsonl, OUT/results.tar.gz,
#    OUT/trials.tar.gz.
set -u
OUT=${1:?usage: run.sh OUT}
touch /tmp/t0; T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-560})); LOG=$OUT/log.txt
SITE=/tmp/bionemo-slurm-gpu/site   # the local_gpu profile's PYTHONPATH
R=benchmarks/results/h200_141gb/levers
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/all/*.whl >>"$LOG" 2>&1 || exit 1
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
{ date -u; cat COMMIT_STAMP; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"; } >>"$LOG" 2>&1

left() { echo $((DEADLINE - $(date +%s))); }
sweep() {  # sweep NAME LAUNCHER-SWEEP-ARGS...
    local name=$1; shift
    if [ "$(left)" -lt 60 ]; then echo "=== $name: skipped (budget)" >>"$LOG"; return; fi
    echo "=== $name: python -m launchers sweep $*" >>"$LOG"
    timeout "$(left)" python3 -m launchers sweep --backend local --cluster local_gpu \
        --recompute none --compile --warmup-steps 3 --steps 6 --gpu-name h200_141gb \
        --trial-timeout "$(left)" "$@" cluster.runs_root=/tmp/runs >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}
step() {  # step NAME PROFILE_STEP-ARGS...
    local name=$1; shift
    if [ "$(left)" -lt 45 ]; then echo "=== $name: skipped (budget)" >>"$LOG"; return; fi
    echo "=== $name: python -m benchmarks.profile_step $*" >>"$LOG"
    timeout "$(( $(left) < 150 ? $(left) : 150 ))" python3 -m benchmarks.profile_step "$@" \
        --json "$OUT/rows.jsonl" >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}

sweep 3b-bf16-34 --model esm2_3b --strategy ddp --fp8 none --min 34 --max 34 --out $R/3b-bf16-34
sweep 3b-fp8-56 --model esm2_3b --strategy ddp --fp8 tensorwise --min 56 --max 56 --out $R/3b-fp8-56
sweep 650m-bf16-99 --model esm2_650m --strategy ddp --fp8 none --min 99 --max 99 --out $R/650m-bf16-99

S="step --model esm2_3b --layers 8 --mbs 32 --compile --steps 6 --warmup 3 --profile 32"
step fp8-tuned $S --fp8
step fp8-tuned-coop $S --fp8 --inductor triton.cooperative_reductions=True
step fp8-tuned-multi $S --fp8 --inductor triton.multi_kernel=1
step bf16-tuned-coop $S --inductor triton.cooperative_reductions=True
step bf16-tuned $S

tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
