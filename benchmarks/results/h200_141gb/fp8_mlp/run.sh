#!/usr/bin/env bash
# (Call 1 ran it at 8a62707 as one file; its setup and helpers are now lib.sh's.)
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
OUT=${1:?usage: run.sh OUT}
BUDGET_S=${BUDGET_S:-560} CALL=${CALL:-call1}
. "$(dirname "$0")/lib.sh"

run gpu-test 150 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_mlp.py -m gpu
run kernels 45 python3 benchmarks/results/h200_141gb/fp8_mlp/kernels.py
B3="--model esm2_3b --min 56 --max 56 --warmup-steps 3 --steps 6 trainer.train.fp8=tensorwise --fp8 tensorwise"
sweep esm2_3b-fp8-56-fused 110 $B3 --out $R/3b-fp8-56/fused trainer.train.fp8_mlp=fused
sweep esm2_3b-fp8-56-torchao 100 $B3 --out $R/3b-fp8-56/torchao
H="python3 -m benchmarks.profile_step step --model esm2_3b --layers 8 --mbs 32 --compile --steps 6 --warmup 3 --profile 32 --fp8 --json $OUT/rows.jsonl"
run harness-fused 80 $H --fp8-mlp fused
sweep esm2_3b-fp8-56-fused-2 100 $B3 --out $R/3b-fp8-56/fused-2 trainer.train.fp8_mlp=fused
run harness-torchao 80 $H

finish
