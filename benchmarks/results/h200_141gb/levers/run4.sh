#!/usr/bin/env bash
# The fourth device call behind README.md here (one nvidia-h200), from the repository root,
# carrying data/sample, .whl/all (pydantic and its dependencies, torchao 0.17.0) and COMMIT_STAMP
# (`make stamp`):
#     BUDGET_S=560 bash benchmarks/results/h200_141gb/levers/run4.sh "$OUT"
# Issue 16's FP8 goal (3B >= 40k tokens/s/GPU; 39.1-39.2k so far): GEMM autotuning in inductor
# (max_autotune_gemm: Triton templates for the fp8 scaled GEMMs and the bf16 ones, timed against
# cuBLAS, with the neighbouring elementwise work fused into their epilogues) and aggressive_fusion,
# on the step harness (benchmarks/profile_step.py: the 3B's shape with 8 of its 36 layers at micro
# batch 32, one process per variant, each with a kernel profile), baselines in the same call.
# Writes OUT/log.txt, OUT/rows.jsonl.
set -u
OUT=${1:?usage: run4.sh OUT}
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-560})); LOG=$OUT/log.txt
SITE=/tmp/bionemo-slurm-gpu/site   # the local_gpu profile's PYTHONPATH
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/all/*.whl >>"$LOG" 2>&1 || exit 1
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
{ date -u; cat COMMIT_STAMP; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"; } >>"$LOG" 2>&1

left() { echo $((DEADLINE - $(date +%s))); }
step() {  # step NAME CAP_S PROFILE_STEP-ARGS...
    local name=$1 cap=$2; shift 2
    if [ "$(left)" -lt 45 ]; then echo "=== $name: skipped (budget)" >>"$LOG"; return; fi
    echo "=== $name: python -m benchmarks.profile_step $*" >>"$LOG"
    local t=$(date +%s)
    timeout "$(( $(left) < cap ? $(left) : cap ))" python3 -m benchmarks.profile_step "$@" \
        --json "$OUT/rows.jsonl" >>"$LOG" 2>&1
    echo "=== $name: rc=$? in $(($(date +%s) - t)) s, at $(($(date +%s) - T0)) s" >>"$LOG"
}

S="step --model esm2_3b --layers 8 --mbs 32 --compile --steps 6 --warmup 3 --profile 32"
step fp8 120 $S --fp8
step fp8-aggressive 120 $S --fp8 --inductor aggressive_fusion=True
step fp8-autotune-gemm 240 $S --fp8 --inductor max_autotune_gemm=True
step bf16-autotune-gemm 200 $S --inductor max_autotune_gemm=True
step bf16 120 $S
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
