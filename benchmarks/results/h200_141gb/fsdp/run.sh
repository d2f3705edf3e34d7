#!/usr/bin/env bash
# The device call behind README.md here (one nvidia-h200), from the repository root, carrying
# data/sample, .slurm_gpu/wheels (pydantic for Python 3.12) and .whl/fsdp (torchao 0.17.0):
#     bash benchmarks/results/h200_141gb/fsdp/run.sh "$OUT"
# Each row is one benchmarks.sweep trial (a fresh `python -m bionemo.train`, padded to 1024,
# compiled, no recompute, median of the timed steps); rows run in priority order until the
# time budget (BUDGET_S) is spent. Writes OUT/summary.json, OUT/log.txt, OUT/sweeps.tar.gz.
set -u
OUT=${1:?usage: run.sh OUT}
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-500})); LOG=$OUT/log.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .slurm_gpu/wheels/*.whl .whl/fsdp/*.whl >>"$LOG" 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"; } >>"$LOG" 2>&1
# The CUDA context's share: what a fresh process holds outside the allocator (memory cap).
python3 - >"$OUT/context.json" 2>>"$LOG" <<'PY'
import json, torch
torch.cuda.init(); torch.zeros(1, device="cuda")
free, total = torch.cuda.mem_get_info()
print(json.dumps({"total_mib": total / 2**20, "free_mib": free / 2**20,
                  "outside_allocator_mib": (total - free) / 2**20,
                  "allocator_reserved_mib": torch.cuda.memory_reserved() / 2**20}))
PY

trial() {  # trial NAME SWEEP-ARGS...
    local name=$1; shift
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 45 ]; then echo "=== $name: skipped (budget)" >>"$LOG"; return; fi
    echo "=== $name: python -m benchmarks.sweep $*" >>"$LOG"
    timeout "$left" python3 -m benchmarks.sweep --recompute none --compile --warmup-steps 3 \
        --steps 6 --gpu-name h200_141gb --out "/tmp/res/$name" --work-dir "/tmp/work/$name" \
        --trial-timeout "$left" "$@" >>"$LOG" 2>&1
    echo "=== $name: rc=$? at $(($(date +%s) - T0)) s" >>"$LOG"
}
trial 650m-ddp --model esm2_650m --min 48 --max 48
trial 3b-ddp --model esm2_3b --min 16 --max 16
trial 3b-fsdp --model esm2_3b --min 16 --max 16 --set parallel.data_parallel=fsdp
trial 650m-ddp-fp8 --model esm2_650m --min 48 --max 48 --set train.fp8=tensorwise
trial 3b-ddp-fp8 --model esm2_3b --min 16 --max 16 --set train.fp8=tensorwise
trial 15b6l-fsdp --model esm2_15b --min 8 --max 8 --set model.num_layers=6 parallel.data_parallel=fsdp
trial 3b-fsdp-fp8 --model esm2_3b --min 16 --max 16 --set parallel.data_parallel=fsdp train.fp8=tensorwise
trial 650m-ddp-cap80 --model esm2_650m --min 54 --max 54 --memory-cap-gib 80

python3 - "$OUT/summary.json" <<'PY' 2>>"$LOG"
import glob, json, sys
rows = []
for f in sorted(glob.glob("/tmp/res/*/*/*.json")):
    d = json.load(open(f))
    for t in d["trials"]:
        rows.append({"name": f.split("/")[3], "command": d["command"], "date": d["date"],
                     "device": d["device"], "torch": d["torch"], **t})
json.dump(rows, open(sys.argv[1], "w"), indent=1)
PY
grep -h "memory cap\|FSDP2 over\|error\|Error" /tmp/work/*/*/*/*/rank0.log /tmp/work/*/*/*/rank0.log 2>/dev/null | sort | uniq -c | head -40 >>"$LOG"
tar czf "$OUT/sweeps.tar.gz" -C /tmp res work 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
