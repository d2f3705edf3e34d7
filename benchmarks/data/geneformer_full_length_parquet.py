# Used for benchmarks/results/h100_80gb/geneformer_106m.*: run in the repo root, then point
# data.vocab / data.gene_medians at a sample vocabulary (make data MODEL=geneformer_10m).
# Full-length pre-tokenized cells (the recipe's parquet format) for a throughput figure: 2047 gene
# tokens per cell (<cls> is prepended by the loader), ids from the sample vocabulary's genes.
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

rng = np.random.default_rng(0)
cells = [(rng.permutation(25421)[:2047] + 5).astype(np.int32) for _ in range(1000)]
pq.write_table(
    pa.table({"input_ids": pa.array(cells, type=pa.list_(pa.int32()))}),
    "gf.parquet",
    row_group_size=100,
)
print("wrote gf.parquet")
