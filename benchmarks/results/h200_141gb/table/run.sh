#!/usr/bin/env bash
# The device calls behind configs/benchmarks/h200_141gb.yaml and README.md here (one nvidia-h200),
# from the repository root, carrying data/sample, data/geneformer_sample/{train,valid,vocab.json,
# gene_medians.json}, .whl/all (pydantic and its dependencies, torchao 0.17.0) and COMMIT_STAMP
# (`make stamp`: the device's copy has no history of its own):
#     BUDGET_S=560 bash benchmarks/results/h200_141gb/table/run.sh big "$OUT"
#     BUDGET_S=560 bash benchmarks/results/h200_141gb/table/run.sh small "$OUT"
# Each line is one `python -m launchers sweep --backend local` on the GPU (cluster profile
# local_gpu, compiled, padded, recompute none); the table sweeps run with --write-table. The search
# bounds come from the H100 sweeps' memory per sequence (benchmarks/results/h100_80gb/), scaled to
# 141 GB, so that each search needs few trials. Writes OUT/log.txt, OUT/h200_141gb.yaml (the
# table as the sweeps left it), OUT/results.tar.gz (every sweep's json/csv/md/png), OUT/trials.tar.gz (the
# trials' configs and rank logs).
set -u
PART=${1:?usage: run.sh big|small OUT}
OUT=${2:?usage: run.sh big|small OUT}
touch /tmp/t0; T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-560})); LOG=$OUT/log.txt
SITE=/tmp/bionemo-slurm-gpu/site   # the local_gpu profile's PYTHONPATH
R=benchmarks/results/h200_141gb/table   # results: R/h200_141gb/<model>.*, R/cap80*/h200_141gb/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/all/*.whl >>"$LOG" 2>&1 || exit 1
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
{ date -u; cat COMMIT_STAMP; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"; } >>"$LOG" 2>&1

sweep() {  # sweep NAME LAUNCHER-SWEEP-ARGS...
    local name=$1; shift
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 60 ]; then echo "=== $name: skipped (budget)" >>"$LOG"; return; fi
    echo "=== $name: python -m launchers sweep $*" >>"$LOG"
    timeout "$left" python3 -m launchers sweep --backend local --cluster local_gpu \
        --recompute none --compile --warmup-steps 2 --steps 4 --gpu-name h200_141gb \
        --trial-timeout "$left" "$@" cluster.runs_root=/tmp/runs >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}

if [ "$PART" = big ]; then
    # issue 16: the 3B under FSDP with a real 80 GB card's memory, with and without FP8
    sweep 3b-cap80-fsdp --model esm2_3b --memory-cap-gib 80 --strategy fsdp --min 16 --max 17 \
        --out $R/cap80
    sweep 3b-cap80-fsdp-fp8 --model esm2_3b --memory-cap-gib 80 --strategy fsdp \
        --fp8 tensorwise --min 24 --max 27 --out $R/cap80-fp8
    # the table: Geneformer 4B under FSDP at the recipe's micro batch, the 3B under DDP
    sweep gf4b --model geneformer_4b --strategy fsdp --min 10 --max 10 --write-table \
        --out $R
    sweep 3b --model esm2_3b --strategy ddp --min 34 --max 36 --write-table --out $R
else
    # Geneformer 4B under FSDP at the recipe's micro batch (the table's row)
    sweep gf4b --model geneformer_4b --strategy fsdp --min 10 --max 10 --write-table --out $R
    # issue 15: the 650M's periodic async saves after the stager fix (the restarts were measured)
    left=$((DEADLINE - $(date +%s)))
    echo "=== async650m: restart_cost.py --no-restarts" >>"$LOG"
    timeout "$left" python3 benchmarks/restart_cost.py --out "$OUT/async" --no-restarts \
        --budget 170 >>"$LOG" 2>&1
    echo "=== async650m: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
    sweep 650m --model esm2_650m --strategy ddp --min 96 --max 104 --write-table --out $R
    # no regression: the 650M at micro batch 48 with this commit and with 00235dd (before issues
    # 13 and 16; a git archive of it in .ab/old), same settings, one after the other
    sweep 650m-48 --model esm2_650m --strategy ddp --min 48 --max 48 --out $R/ab-new
    if [ -d .ab/old ] && [ $((DEADLINE - $(date +%s))) -gt 60 ]; then
        ln -sfn "$PWD/data" .ab/old/data
        echo "=== 650m-48-old: 00235dd benchmarks.sweep" >>"$LOG"
        (cd .ab/old && PYTHONPATH=$SITE timeout $((DEADLINE - $(date +%s))) python3 -m benchmarks.sweep \
            --model esm2_650m --min 48 --max 48 --recompute none --compile --warmup-steps 2 \
            --steps 4 --gpu-name h200_141gb --out "$PWD/../../$R/ab-old" --work-dir /tmp/ab-old) \
            >>"$LOG" 2>&1
        echo "=== 650m-48-old: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
    fi
    sweep gf106m --model geneformer_106m --min 32 --max 64 --write-table --out $R
    sweep gf10m --model geneformer_10m --min 128 --max 256 --write-table --out $R
    sweep 8m --model esm2_8m --min 512 --max 1024 --write-table --out $R
fi

cp configs/benchmarks/h200_141gb.yaml "$OUT/h200_141gb.yaml"
grep -h "memory cap\|FSDP2\|float8\|Error\|error" /tmp/runs/*/*/trials/*/*/*/rank0.log /tmp/ab-old/*/*/*/rank0.log 2>/dev/null \
    | sort | uniq -c | head -30 >>"$LOG"
tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
