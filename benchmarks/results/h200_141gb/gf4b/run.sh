#!/usr/bin/env bash
# The device call behind README.md here (one nvidia-h200), from the repository root, carrying
# data/geneformer_sample/{train,valid,vocab.json,gene_medians.json}, .whl/all (pydantic and its
# dependencies, torchao 0.17.0, bionemo-scdl 0.1.3) and COMMIT_STAMP (`make stamp`):
#     BUDGET_S=560 bash benchmarks/results/h200_141gb/gf4b/run.sh "$OUT"
# Geneformer 4B (hidden 2560, FFN 10240, 36 layers: the ESM-2 3B's block at sequence 2048) on one
# H200: DDP against FSDP and bf16 against FP8 tensorwise at the recipe's micro batch 10, one sweep
# over the four (--write-table: the table's row becomes the fastest), then FP8 at 16, which the
# smaller fp8 activations may leave room for. Writes OUT/log.txt, OUT/h200_141gb.yaml (the table
# as the sweep left it), OUT/results.tar.gz, OUT/trials.tar.gz.
set -u
OUT=${1:?usage: run.sh OUT}
touch /tmp/t0; T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-560})); LOG=$OUT/log.txt
SITE=/tmp/bionemo-slurm-gpu/site   # the local_gpu profile's PYTHONPATH
R=benchmarks/results/h200_141gb/gf4b
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
        --model geneformer_4b --recompute none --compile --warmup-steps 2 --steps 4 \
        --gpu-name h200_141gb --trial-timeout "$(left)" "$@" cluster.runs_root=/tmp/runs >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}

sweep gf4b-10 --strategy ddp,fsdp --fp8 none,tensorwise --min 10 --max 10 --write-table --out $R
sweep gf4b-ddp-fp8-16 --strategy ddp --fp8 tensorwise --min 16 --max 16 --out $R/ddp-fp8-16

cp configs/benchmarks/h200_141gb.yaml "$OUT/h200_141gb.yaml"
tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
