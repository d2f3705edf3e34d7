#!/usr/bin/env bash
# One device call (nvidia-h200) behind README.md here: train.fp8_mlp=fused (bionemo/models/fp8_mlp.py,
# hand-written Triton kernels around the MLP's FP8 GEMMs) against torchao's Float8Linear MLPs.
# From the repository root, carrying .slurm_gpu (benchmarks/slurm_gpu/prepare.sh fetch: pydantic,
# torchao), data/sample and COMMIT_STAMP (`make stamp`):
#     CALL=call1 BUDGET_S=560 bash benchmarks/results/h200_141gb/fp8_mlp/run.sh "$OUT"
# 1. the gpu tests (Triton kernels against the torch references; a 2-layer 3B-shaped model trains
#    as with torchao);
# 2. the kernels alone on the 3B's MLP activation at micro batch 56 (kernels.py);
# 3. through the trainer (make sweep, one trial each): the 3B with FP8 at micro batch 56 (the
#    table's row), fused then torchao; then, as time allows, the 8-layer 3B harness at micro batch
#    32 with a kernel profile (fused), a second fused trial, the harness with torchao.
# Writes OUT/log.txt, OUT/rows.jsonl, OUT/results.tar.gz, OUT/trials.tar.gz.
set -u
OUT=${1:?usage: run.sh OUT}
touch /tmp/t0; T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-560})); LOG=$OUT/log.txt
R=benchmarks/results/h200_141gb/fp8_mlp/${CALL:-call1}
benchmarks/slurm_gpu/prepare.sh site >>"$LOG" 2>&1 || exit 1
export PYTHONPATH=/tmp/bionemo-slurm-gpu/site:$PWD PYTHONUNBUFFERED=1
{ date -u; cat COMMIT_STAMP; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, torchao, triton; print('torch', torch.__version__, 'torchao', torchao.__version__, 'triton', triton.__version__)"; } >>"$LOG" 2>&1

left() { echo $((DEADLINE - $(date +%s))); }
run() {  # run NAME CAP_S COMMAND...
    local name=$1 cap=$2; shift 2
    if [ "$(left)" -lt 40 ]; then echo "=== $name: skipped (budget)" >>"$LOG"; return; fi
    echo "=== $name: $*" >>"$LOG"
    timeout "$(( $(left) < cap ? $(left) : cap ))" "$@" >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}
sweep() {  # sweep NAME MIN_LEFT LAUNCHER-SWEEP-ARGS...
    local name=$1 need=$2; shift 2
    if [ "$(left)" -lt "$need" ]; then echo "=== $name: skipped (budget)" >>"$LOG"; return; fi
    echo "=== $name: python -m launchers sweep $*" >>"$LOG"
    timeout "$(left)" python3 -m launchers sweep --backend local --cluster local_gpu \
        --recompute none --compile --warmup-steps 3 --steps 6 --gpu-name h200_141gb \
        --trial-timeout "$(left)" "$@" cluster.runs_root=/tmp/runs \
        "cluster.env.PYTHONPATH=$PYTHONPATH" >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}

run gpu-test 150 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_mlp.py -m gpu
run kernels 45 python3 benchmarks/results/h200_141gb/fp8_mlp/kernels.py
B3="--model esm2_3b --min 56 --max 56 trainer.train.fp8=tensorwise --fp8 tensorwise"
sweep esm2_3b-fp8-56-fused 110 $B3 --out $R/3b-fp8-56/fused trainer.train.fp8_mlp=fused
sweep esm2_3b-fp8-56-torchao 100 $B3 --out $R/3b-fp8-56/torchao
H="python3 -m benchmarks.profile_step step --model esm2_3b --layers 8 --mbs 32 --compile --steps 6 --warmup 3 --profile 32 --fp8 --json $OUT/rows.jsonl"
run harness-fused 80 $H --fp8-mlp fused
sweep esm2_3b-fp8-56-fused-2 100 $B3 --out $R/3b-fp8-56/fused-2 trainer.train.fp8_mlp=fused
run harness-torchao 80 $H

tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
