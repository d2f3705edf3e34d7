#!/usr/bin/env bash
# The third device call (nvidia-h200) behind README.md here, at the kernels of call 2. Carrying
# .slurm_gpu, data/sample, data/geneformer_sample/{train,valid,vocab.json,gene_medians.json}
# (its h5ad/ is not read) and COMMIT_STAMP:
#     CALL=call3 BUDGET_S=170 MAX3=57 bash benchmarks/results/h200_141gb/fp8_mlp/run3.sh "$OUT"
# make sweep, one trial per micro batch, each writing its table row (--write-table):
# 1. the 3B with FP8, fused, micro batches 56..MAX3 (the row, and its largest micro batch);
# 2. as time allows, Geneformer 4B with FP8 at micro batch 20 (its row), fused then torchao (the
#    row is left as the second writes it: torchao; README.md says which the table keeps).
# Writes OUT/log.txt, OUT/h200_141gb.yaml (the table as the sweeps left it), OUT/results.tar.gz,
# OUT/trials.tar.gz.
OUT=${1:?usage: run3.sh OUT}
BUDGET_S=${BUDGET_S:-270} CALL=${CALL:-call3}
MAX3=${MAX3:-58}  # the 3B sweep's largest micro batch
. "$(dirname "$0")/lib.sh"

sweep esm2_3b-fp8-fused-56-$MAX3 120 --write-table --model esm2_3b --min 56 --max $MAX3 --warmup-steps 3 \
    --steps 6 --strategy ddp --fp8 tensorwise --out $R/3b-fp8-fused-56-$MAX3 trainer.train.fp8_mlp=fused
G4="--write-table --model geneformer_4b --min 20 --max 20 --warmup-steps 2 --steps 4 --strategy ddp --fp8 tensorwise"
sweep geneformer_4b-fp8-20-fused 85 $G4 --out $R/gf4b-fp8-20/fused trainer.train.fp8_mlp=fused
sweep geneformer_4b-fp8-20-torchao 80 $G4 --out $R/gf4b-fp8-20/torchao trainer.train.fp8_mlp=torchao

cp configs/benchmarks/h200_141gb.yaml "$OUT/h200_141gb.yaml"
finish
