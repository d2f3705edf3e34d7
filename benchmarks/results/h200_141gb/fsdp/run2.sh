#!/usr/bin/env bash
# The second device call behind README.md here (one nvidia-h200), from the repository root,
# carrying data/sample, .slurm_gpu (benchmarks/slurm_gpu/prepare.sh fetch: pydantic and its
# dependencies, torchao 0.17.0) and COMMIT_STAMP (`make stamp`):
#     BUDGET_S=520 bash benchmarks/results/h200_141gb/fsdp/run2.sh "$OUT"
# Does FP8 pay at the 15B's shape (hidden 5120, 40 heads, FFN 20480) as at the 3B's? 6 of its 48
# layers under FSDP on one GPU (the model behind this folder's first call), torch engine, bf16
# and FP8 tensorwise in one sweep each at micro batch 8 and 16.
# Writes OUT/log.txt, OUT/results.tar.gz, OUT/trials.tar.gz.
set -u
OUT=${1:?usage: run2.sh OUT}
touch /tmp/t0; T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-520})); LOG=$OUT/log.txt
R=benchmarks/results/h200_141gb/fsdp
benchmarks/slurm_gpu/prepare.sh site >>"$LOG" 2>&1 || exit 1
export PYTHONPATH=/tmp/bionemo-slurm-gpu/site:$PWD PYTHONUNBUFFERED=1
{ date -u; cat COMMIT_STAMP; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"; } >>"$LOG" 2>&1

left() { echo $((DEADLINE - $(date +%s))); }
for mbs in 8 16; do
    if [ "$(left)" -lt 60 ]; then echo "=== mbs $mbs: skipped (budget)" >>"$LOG"; continue; fi
    echo "=== 15B-shaped, 6 layers, FSDP, bf16 and FP8, micro batch $mbs" >>"$LOG"
    timeout "$(left)" python3 -m launchers sweep --backend local --cluster local_gpu \
        --model esm2_15b --tp 1 --strategy fsdp --fp8 none,tensorwise --min $mbs --max $mbs \
        --recompute none --compile --warmup-steps 3 --steps 6 --gpu-name h200_141gb \
        --trial-timeout "$(left)" --out $R/15b6l-$mbs trainer.model.num_layers=6 \
        trainer.train.engine=torch cluster.runs_root=/tmp/runs >>"$LOG" 2>&1
    echo "=== rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
done

tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
