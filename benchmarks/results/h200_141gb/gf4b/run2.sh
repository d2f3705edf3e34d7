#!/usr/bin/env bash
# The third device call behind README.md here (one nvidia-h200), from the repository root,
# carrying data/geneformer_sample/{train,valid,vocab.json,gene_medians.json}, .slurm_gpu
# (benchmarks/slurm_gpu/prepare.sh fetch: pydantic and its dependencies, torchao 0.17.0,
# bionemo-scdl 0.1.3 and its tree) and COMMIT_STAMP (`make stamp`):
#     BUDGET_S=500 bash benchmarks/results/h200_141gb/gf4b/run2.sh "$OUT"
# The largest micro batch of the 4B's table row (DDP + FP8 tensorwise; 16 fit at 114.5 GiB, larger
# was not tried): one sweep from 17 to 21 that writes the row (--write-table). Writes OUT/log.txt,
# OUT/h200_141gb.yaml (the table as the sweep left it), OUT/results.tar.gz, OUT/trials.tar.gz.
set -u
OUT=${1:?usage: run2.sh OUT}
touch /tmp/t0; T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-500})); LOG=$OUT/log.txt
R=benchmarks/results/h200_141gb/gf4b
benchmarks/slurm_gpu/prepare.sh site >>"$LOG" 2>&1 || exit 1
export PYTHONPATH=/tmp/bionemo-slurm-gpu/site:$PWD PYTHONUNBUFFERED=1
{ date -u; cat COMMIT_STAMP; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"; } >>"$LOG" 2>&1

left() { echo $((DEADLINE - $(date +%s))); }
echo "=== python -m launchers sweep (DDP + FP8, 17..21, --write-table)" >>"$LOG"
timeout "$(left)" python3 -m launchers sweep --backend local --cluster local_gpu \
    --model geneformer_4b --recompute none --compile --warmup-steps 2 --steps 4 \
    --gpu-name h200_141gb --trial-timeout "$(left)" --strategy ddp --fp8 tensorwise \
    --min 17 --max 21 --write-table --out $R/max cluster.runs_root=/tmp/runs >>"$LOG" 2>&1
echo "=== rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"

cp configs/benchmarks/h200_141gb.yaml "$OUT/h200_141gb.yaml"
tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
