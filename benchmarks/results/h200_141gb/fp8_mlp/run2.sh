#!/usr/bin/env bash
# (Call 2 ran it at ee953f1 as one file; its setup and helpers are now lib.sh's.)
# The second device call (nvidia-h200) behind README.md here, after the kernels were rewritten to
# evaluate the activation once per direction (fp8_mlp_kernels.py). Same carry and layout as run.sh:
#     CALL=call2 BUDGET_S=540 bash benchmarks/results/h200_141gb/fp8_mlp/run2.sh "$OUT"
# 1. the gpu tests; 2. kernels.py; 3. make sweep, one trial each: the 3B with FP8 at micro batch 56
# fused, torchao, fused; Geneformer 4B with FP8 at micro batch 20 (its table row) fused, torchao;
# 4. as time allows, the 8-layer 3B harness with a kernel profile (fused).
OUT=${1:?usage: run2.sh OUT}
BUDGET_S=${BUDGET_S:-540} CALL=${CALL:-call2}
. "$(dirname "$0")/lib.sh"

run gpu-test 120 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_mlp.py -m gpu
run kernels 45 python3 benchmarks/results/h200_141gb/fp8_mlp/kernels.py
B3="--model esm2_3b --min 56 --max 56 --warmup-steps 3 --steps 6 trainer.train.fp8=tensorwise --fp8 tensorwise"
sweep esm2_3b-fp8-56-fused 100 $B3 --out $R/3b-fp8-56/fused trainer.train.fp8_mlp=fused
sweep esm2_3b-fp8-56-torchao 90 $B3 --out $R/3b-fp8-56/torchao
sweep esm2_3b-fp8-56-fused-2 90 $B3 --out $R/3b-fp8-56/fused-2 trainer.train.fp8_mlp=fused
G4="--model geneformer_4b --min 20 --max 20 --warmup-steps 2 --steps 4 --strategy ddp --fp8 tensorwise"
sweep geneformer_4b-fp8-20-fused 95 $G4 --out $R/gf4b-fp8-20/fused trainer.train.fp8_mlp=fused
sweep geneformer_4b-fp8-20-torchao 85 $G4 --out $R/gf4b-fp8-20/torchao
run harness-fused 70 python3 -m benchmarks.profile_step step --model esm2_3b --layers 8 --mbs 32 \
    --compile --steps 6 --warmup 3 --profile 32 --fp8 --json "$OUT/rows.jsonl" --fp8-mlp fused

finish
