#!/usr/bin/env bash
# The second device call behind README.md here (one nvidia-h200), right after stage.sh (which left
# the first part of nvidia-cutlass-dsl-libs-cu13's tar.xz in /tmp/fa4parts). From the repository
# root, carrying .fa4/b (the rest of that tar.xz and flash-attn-4 4.0.0b36's other wheels),
# .slurm_gpu (benchmarks/slurm_gpu/prepare.sh fetch), data/sample and COMMIT_STAMP (`make stamp`):
#     CALL=call2 BUDGET_S=560 bash benchmarks/results/h200_141gb/fa4/run.sh "$OUT"
# (call1 ran it at fa05e99, when torch's FA4 glue met flash-attn-4 4.0.0b36 directly and every
# FA4 run failed: "too many values to unpack"; call2 at 24287ed, where torch's FA4 glue refused
# varlen_attn's backward: "windowed attention not supported". bionemo/models/flash4.py, torch's
# registry hook with flash-attn-4's kernels and its own glue, is the fix; call3 runs it.)
# 1. FlashAttention-4 against torch's FlashAttention-2 on ESM-2's variable-length segments: the
#    gpu test (output and gradients against fp32), then one attention layer of the 3B at micro
#    batch 56 (benchmarks.profile_step attention), without and with --flash-attention fa4.
# 2. Through the trainer (make sweep, one trial each): the 3B with FP8 at micro batch 56 (the
#    table's row) with fa4, without, and with fa4 again; the 650M at 99 and the 3B in bf16 at 34
#    with fa4; the 650M without fa4 as time allows.
# Writes OUT/log.txt, OUT/results.tar.gz, OUT/trials.tar.gz.
set -u
OUT=${1:?usage: run.sh OUT}
touch /tmp/t0; T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-560})); LOG=$OUT/log.txt
R=benchmarks/results/h200_141gb/fa4/${CALL:-call2}
S=/tmp/fa4site
cat /tmp/fa4parts/cu13.tar.xz.part00 .fa4/b/cu13.tar.xz.part01 >/tmp/cu13.tar.xz 2>>"$LOG"
echo "$(cat .fa4/b/cu13.sha256)  /tmp/cu13.tar.xz" | sha256sum -c - >>"$LOG" 2>&1 ||
    { echo "error: the first part (stage.sh) is missing or corrupt: machine not warm?" >>"$LOG"; exit 3; }
mkdir -p $S
# pip first: --target skips a top-level folder that exists, so the cu13 tree goes in after it
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $S .fa4/b/*.whl >>"$LOG" 2>&1
xz -dc -T0 /tmp/cu13.tar.xz | tar x -C $S 2>>"$LOG"
benchmarks/slurm_gpu/prepare.sh site >>"$LOG" 2>&1 || exit 1
export PYTHONPATH=/tmp/bionemo-slurm-gpu/site:$S:$S/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4cache
{ date -u; cat COMMIT_STAMP; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, torchao, flash_attn.cute.interface, cutlass; from torch.nn.attention import list_flash_attention_impls as l; print('torch', torch.__version__, 'torchao', torchao.__version__, 'impls', l())";
  python3 -m pip list 2>/dev/null | grep -i -E "flash|cutlass|quack|tvm|dlpack|cuda-bindings"; } >>"$LOG" 2>&1

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

run gpu-test 150 python3 -m pytest -q -p no:cacheprovider tests/test_flash_attention.py -m gpu
run attention-fa2 60 python3 -m benchmarks.profile_step attention --model esm2_3b --mbs 56
run attention-fa4 90 python3 -m benchmarks.profile_step attention --model esm2_3b --mbs 56 --flash-attention fa4
B3="--model esm2_3b --min 56 --max 56 trainer.train.fp8=tensorwise --fp8 tensorwise"
sweep esm2_3b-fp8-56-fa4 100 $B3 --out $R/3b-fp8-56/fa4 trainer.train.flash_attention=fa4
sweep esm2_3b-fp8-56-torch 90 $B3 --out $R/3b-fp8-56/torch
sweep esm2_3b-fp8-56-fa4-2 90 $B3 --out $R/3b-fp8-56/fa4-2 trainer.train.flash_attention=fa4
sweep esm2_650m-bf16-99-fa4 80 --model esm2_650m --min 99 --max 99 --out $R/650m-bf16-99/fa4 \
    trainer.train.flash_attention=fa4
sweep esm2_3b-bf16-34-fa4 90 --model esm2_3b --min 34 --max 34 --fp8 none trainer.train.fp8=none \
    --out $R/3b-bf16-34/fa4 trainer.train.flash_attention=fa4
sweep esm2_650m-bf16-99-torch 70 --model esm2_650m --min 99 --max 99 --out $R/650m-bf16-99/torch

tar czf "$OUT/results.tar.gz" $(find $R -newer /tmp/t0 -type f) 2>>"$LOG"
tar czf "$OUT/trials.tar.gz" -C /tmp $(cd /tmp && ls runs/*/*/trials/*/*/*/{config.yaml,rank0.log} 2>/dev/null) 2>>"$LOG"
echo "done at $(($(date +%s) - T0)) s" >>"$LOG"
