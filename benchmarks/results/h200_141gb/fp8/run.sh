#!/usr/bin/env bash
# The device call behind README.md here (one nvidia-h200, issue 16's FP8 and FSDP-under-80-GB
# lines), from the repository root, carrying data/sample, .whl/all (pydantic and its dependencies,
# torchao 0.17.0) and COMMIT_STAMP (`make stamp`):
#     BUDGET_S=540 bash benchmarks/results/h200_141gb/fp8/run.sh "$OUT"
# Each sweep line is one `python -m launchers sweep --backend local` on the GPU (cluster profile
# local_gpu, compiled, padded, recompute none); then the 3B block's GEMMs in bf16 and fp8, and a
# kernel profile of the 3B's FP8 step. Writes OUT/log.txt, OUT/results.tar.gz, OUT/trials.tar.gz.
set -u
OUT=${1:?usage: run.sh OUT}
touch /tmp/t0; T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-540})); LOG=$OUT/log.txt
SITE=/tmp/bionemo-slurm-gpu/site   # the local_gpu profile's PYTHONPATH
R=benchmarks/results/h200_141gb/fp8
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
        --recompute none --compile --warmup-steps 2 --steps 4 --gpu-name h200_141gb \
        --trial-timeout "$(left)" "$@" cluster.runs_root=/tmp/runs >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}
step() {  # step NAME PROFILE_STEP-ARGS...
    local name=$1; shift
    if [ "$(left)" -lt 40 ]; then echo "=== $name: skipped (budget)" >>"$LOG"; return; fi
    echo "=== $name: python -m benchmarks.profile_step $*" >>"$LOG"
    timeout "$(left)" python3 -m benchmarks.profile_step "$@" >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}

# issue 16: the 3B under FSDP with a real 80 GB card's memory, FP8 at the A100 table's micro batch
sweep cap80-fsdp-fp8 --model esm2_3b --memory-cap-gib 80 --strategy fsdp --fp8 tensorwise \
    --min 16 --max 16 --out $R/cap80-fsdp-fp8-16
sweep cap80-fsdp-fp8 --model esm2_3b --memory-cap-gib 80 --strategy fsdp --fp8 tensorwise \
    --min 20 --max 20 --out $R/cap80-fsdp-fp8-20
# FP8 at 3B, same run: none / tensorwise / rowwise at micro batch 32 under DDP (one GPU, uncapped)
sweep ddp-32 --model esm2_3b --strategy ddp --fp8 none,tensorwise,rowwise --min 32 --max 32 \
    --out $R/ddp-32
sweep ddp-fp8-48 --model esm2_3b --strategy ddp --fp8 tensorwise --min 48 --max 48 --out $R/ddp-48
step gemm gemm --model esm2_3b --tokens 32768
step profile-fp8 step --model esm2_3b --mbs 32 --compile --fp8 --steps 4 --warmup 3 --profile 32

tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
