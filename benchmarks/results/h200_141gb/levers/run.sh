#!/usr/bin/env bash
# The first device call behind README.md here (one nvidia-h200), from the repository root,
# carrying data/sample, .whl/all (pydantic and its dependencies, torchao 0.17.0) and COMMIT_STAMP
# (`make stamp`):
#     BUDGET_S=560 bash benchmarks/results/h200_141gb/levers/run.sh "$OUT"
# 1. issue 16's memory-cap line for the 3B: the H100 80GB ran micro batch 14 and ran out of memory
#    at 15 (benchmarks/results/h100_80gb/esm2_3b.md: DDP, bf16, compiled, no recompute); the same
#    sweep on the H200 under --memory-cap-gib 80 must give the same maximum.
# 2. levers on the 3B block's non-GEMM time (issue 16's 34k bf16 / 40k FP8 goals): the step
#    harness (benchmarks/profile_step.py) on the 3B's shape with 8 of its 36 layers at micro batch
#    32, one process per variant: inductor code-generation options and FP8 layer choices, each with
#    a kernel profile. Writes OUT/log.txt, OUT/rows.jsonl, OUT/results.tar.gz, OUT/trials.tar.gz.
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

sweep cap80-ddp-bf16 --model esm2_3b --memory-cap-gib 80 --strategy ddp --fp8 none \
    --min 14 --max 15 --out $R/cap80-ddp-bf16

S="step --model esm2_3b --layers 8 --mbs 32 --compile --steps 6 --warmup 3 --profile 32"
TILE="--inductor triton.prefer_nd_tiling=True --inductor triton.tile_reductions=True"
step fp8 $S --fp8
step fp8-tile $S --fp8 $TILE
step fp8-skip-out $S --fp8 --fp8-skip attn.out_proj
step bf16 $S
step bf16-tile $S $TILE
step bf16-mix-order $S --inductor triton.mix_order_reduction=True
step fp8-autotune-pw $S --fp8 --inductor max_autotune_pointwise=True
step bf16-autotune-pw $S --inductor max_autotune_pointwise=True

tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
