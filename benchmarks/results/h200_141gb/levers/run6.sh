#!/usr/bin/env bash
# The sixth device call behind README.md here (one nvidia-h200), from the repository root,
# carrying data/sample, .slurm_gpu (benchmarks/slurm_gpu/prepare.sh fetch: pydantic and its
# dependencies, torchao 0.17.0) and COMMIT_STAMP (`make stamp`):
#     BUDGET_S=560 bash benchmarks/results/h200_141gb/levers/run6.sh "$OUT"
# 1. trainer.parallel.fp8_all_gather on a GPU for the first time: the 3B under FSDP (one GPU, a
#    mesh of one) with FP8 tensorwise at micro batch 16, without and with torchao's float8
#    all-gather, one sweep trial each (does compile take the fp8 weight wrapper; what it costs).
# 2. Two more inductor options against the FP8 overhead on the step harness (8 of the 3B's 36
#    layers, micro batch 32, kernel profile): benchmark_fusion (time a fused kernel against its
#    parts before fusing) and split_reductions=False, with the defaults as the baseline.
# Writes OUT/log.txt, OUT/rows.jsonl, OUT/results.tar.gz, OUT/trials.tar.gz.
set -u
OUT=${1:?usage: run6.sh OUT}
touch /tmp/t0; T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-560})); LOG=$OUT/log.txt
R=benchmarks/results/h200_141gb/levers
benchmarks/slurm_gpu/prepare.sh site >>"$LOG" 2>&1 || exit 1
export PYTHONPATH=/tmp/bionemo-slurm-gpu/site:$PWD PYTHONUNBUFFERED=1
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
step() {  # step NAME CAP_S PROFILE_STEP-ARGS...
    local name=$1 cap=$2; shift 2
    if [ "$(left)" -lt 45 ]; then echo "=== $name: skipped (budget)" >>"$LOG"; return; fi
    echo "=== $name: python -m benchmarks.profile_step $*" >>"$LOG"
    timeout "$(( $(left) < cap ? $(left) : cap ))" python3 -m benchmarks.profile_step "$@" \
        --json "$OUT/rows.jsonl" >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}

for ag in true false; do
    sweep "esm2_3b-fsdp-tensorwise-16-all-gather-$ag" --model esm2_3b --strategy fsdp \
        --fp8 tensorwise --min 16 --max 16 --out $R/fp8-all-gather/$ag \
        trainer.parallel.data_parallel=fsdp trainer.train.fp8=tensorwise \
        trainer.parallel.fp8_all_gather=$ag
done
S="step --model esm2_3b --layers 8 --mbs 32 --compile --steps 6 --warmup 3 --profile 32 --fp8"
step fp8 120 $S
step fp8-benchmark-fusion 200 $S --inductor benchmark_fusion=True
step fp8-no-split-reductions 120 $S --inductor split_reductions=False

tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
