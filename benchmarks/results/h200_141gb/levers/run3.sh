#!/usr/bin/env bash
# The third device call behind README.md here (one nvidia-h200), from the repository root,
# carrying data/sample, .whl/all (pydantic and its dependencies, torchao 0.17.0) and COMMIT_STAMP
# (`make stamp`):
#     BUDGET_S=560 bash benchmarks/results/h200_141gb/levers/run3.sh "$OUT"
# A/B of bionemo.distributed.parallel.tune_generated_kernels() (inductor's max_autotune_pointwise)
# through the trainer, both sides in this one call: off (TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE=0,
# which the trainer leaves alone) then on (the trainer's default), one sweep trial each: ESM-2 3B
# bf16 at micro batch 34, 3B FP8 tensorwise at 56, 650M bf16 at 99 (the H200 table's rows).
# Writes OUT/log.txt, OUT/results.tar.gz, OUT/trials.tar.gz.
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

for m in "esm2_3b none 34" "esm2_3b tensorwise 56" "esm2_650m none 99"; do
    set -- $m
    TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE=0 sweep "$1-$2-$3-untuned" --model $1 --strategy ddp \
        --fp8 $2 --min $3 --max $3 --out $R/ab/$1-$2-$3-untuned
    sweep "$1-$2-$3-tuned" --model $1 --strategy ddp --fp8 $2 --min $3 --max $3 \
        --out $R/ab/$1-$2-$3-tuned
done

tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
