#!/usr/bin/env bash
# The second device call behind README.md here (one nvidia-h200), from the repository root,
# carrying data/sample, .whl/all and COMMIT_STAMP (`make stamp`):
#     BUDGET_S=520 bash benchmarks/results/h200_141gb/fp8/run2.sh "$OUT"
# 1. the H200 table's 3B row with FP8: the sweep searches DDP + FP8 tensorwise from micro batch 48
#    (measured fastest in call 1) to 64 and writes the row (--write-table);
# 2. kernel profiles of the 3B step at micro batch 32, bf16 and FP8 (benchmarks/profile_step.py).
# Writes OUT/log.txt, OUT/h200_141gb.yaml (the table as the sweep left it), OUT/results.tar.gz,
# OUT/trials.tar.gz, OUT/profile-{bf16,fp8}.txt and OUT/rows.jsonl.
set -u
OUT=${1:?usage: run2.sh OUT}
touch /tmp/t0; T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-520})); LOG=$OUT/log.txt
SITE=/tmp/bionemo-slurm-gpu/site   # the local_gpu profile's PYTHONPATH
R=benchmarks/results/h200_141gb/fp8
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/all/*.whl >>"$LOG" 2>&1 || exit 1
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
{ date -u; cat COMMIT_STAMP; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"; } >>"$LOG" 2>&1
left() { echo $((DEADLINE - $(date +%s))); }

echo "=== table-3b-fp8: python -m launchers sweep" >>"$LOG"
timeout $(($(left) - 170)) python3 -m launchers sweep --backend local --cluster local_gpu \
    --recompute none --compile --warmup-steps 2 --steps 4 --gpu-name h200_141gb \
    --model esm2_3b --strategy ddp --fp8 tensorwise --min 48 --max 64 --write-table \
    --trial-timeout 200 --out $R/table cluster.runs_root=/tmp/runs >>"$LOG" 2>&1
echo "=== table-3b-fp8: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
cp configs/benchmarks/h200_141gb.yaml "$OUT/h200_141gb.yaml"

for v in bf16 fp8; do
    if [ "$(left)" -lt 60 ]; then echo "=== profile-$v: skipped (budget)" >>"$LOG"; continue; fi
    flag=$([ $v = fp8 ] && echo --fp8)
    echo "=== profile-$v: python -m benchmarks.profile_step step --model esm2_3b --mbs 32 --compile $flag --steps 4 --warmup 3 --profile 32" >>"$LOG"
    timeout "$(left)" python3 -m benchmarks.profile_step step --model esm2_3b --mbs 32 --compile \
        $flag --steps 4 --warmup 3 --profile 32 --json "$OUT/rows.jsonl" >"$OUT/profile-$v.txt" 2>&1
    echo "=== profile-$v: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
done

tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
