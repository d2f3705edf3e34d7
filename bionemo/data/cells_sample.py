"""A small synthetic single-cell set in Geneformer's layout, for tests, debugging and smoke runs.

    python -m bionemo.data.cells_sample --out data/geneformer_sample [--cells 2000] [--seed 0]

Nothing is downloaded. Writes into the out dir:
    h5ad/train.h5ad, h5ad/valid.h5ad   AnnData, raw counts in X (sparse CSR), var['feature_id']
    train/, valid/                     the same cells as SCDL stores (bionemo-scdl)
    vocab.json                         <cls> <mask> <pad> <sep> <unk>, then one token per gene
    gene_medians.json                  Ensembl id -> median non-zero normalised expression (train)

Counts are shaped like droplet single-cell RNA-seq: each gene has a detection propensity and an
expression level (log-normal, correlated), each cell a size factor and a number of expressed
genes (log-normal, median 2000, so about half the cells have more genes than fit in 2047
tokens and get truncated). A cell's genes are drawn without replacement by propensity, and each
count is 1 + Poisson(level x size). Gene ids look like Ensembl's but lie in an unused range
(ENSG9...). 25,421 genes + 5 specials = 25,426 tokens, the size of the real Geneformer vocabulary,
so the presets' model.vocab_size fits both. The same arguments give the same cells, vocabulary
and medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from bionemo.data.cells_tokenizer import SAMPLE_SPECIALS

NUM_GENES = 25_426 - len(SAMPLE_SPECIALS)  # the real Geneformer vocabulary's size, specials incl.
MEDIAN_GENES_PER_CELL = 2000  # typical for 10x Chromium cells after QC (CELLxGENE: ~1.5-2.5k)
GENES_SIGMA = 0.45  # log-space spread: 5-95% of cells between ~950 and ~4200 genes
MIN_GENES = 200  # the usual QC floor (cells with fewer genes are dropped as empty droplets)
PROPENSITY_SIGMA = 1.5  # spread of gene detection propensity: a few genes in nearly every cell
LEVEL_SIGMA = 0.7  # extra spread of a gene's expression level beyond its propensity
SIZE_SIGMA = 0.3  # spread of the per-cell size factor (sequencing depth)
NORMALIZE_TOTAL = 10_000.0  # counts per cell before the median is taken (CellDataConfig default)
GENE_ID_BASE = 90_000_000_000  # ENSG + 11 digits; real human ids are ENSG00000...


def gene_ids(n: int) -> list[str]:
    return [f"ENSG{GENE_ID_BASE + i:011d}" for i in range(n)]


def synthetic_counts(
    rng: np.random.Generator,
    n_cells: int,
    propensity: np.ndarray,
    level: np.ndarray,
    median_genes: int,
):
    """A CSR matrix (scipy) of n_cells x len(propensity) raw counts, float32."""
    import scipy.sparse as sp

    n_genes = len(propensity)
    k = np.exp(rng.normal(np.log(median_genes), GENES_SIGMA, n_cells)).round().astype(np.int64)
    k = np.clip(k, min(MIN_GENES, n_genes // 4), n_genes // 2)  # never more than half the genes
    size = np.exp(rng.normal(0.0, SIZE_SIGMA, n_cells))
    log_p = np.log(propensity)
    indptr = np.concatenate(([0], np.cumsum(k)))
    indices = np.empty(indptr[-1], dtype=np.int32)
    data = np.empty(indptr[-1], dtype=np.float32)
    for c in range(n_cells):
        # Weighted sampling without replacement (Gumbel top-k): the k largest log p + Gumbel noise.
        keys = log_p + rng.gumbel(size=n_genes)
        genes = np.sort(np.argpartition(-keys, k[c])[: k[c]])
        indices[indptr[c] : indptr[c + 1]] = genes
        data[indptr[c] : indptr[c + 1]] = 1 + rng.poisson(level[genes] * size[c])
    return sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))


def gene_medians(counts, normalize_total: float = NORMALIZE_TOTAL) -> np.ndarray:
    """Per gene: median over the cells that express it of count / cell total * normalize_total
    (Geneformer's definition). Genes expressed in no cell get the median of the others."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    norm = counts.multiply(1.0 / totals[:, None]).tocsc() * normalize_total
    med = np.full(norm.shape[1], np.nan)
    for g in range(norm.shape[1]):
        col = norm.data[norm.indptr[g] : norm.indptr[g + 1]]
        if len(col):
            med[g] = np.median(col)
    med[np.isnan(med)] = np.nanmedian(med)
    return med


def write_h5ad(path: Path, counts, genes: list[str], prefix: str) -> None:
    import anndata as ad
    import pandas as pd

    var = pd.DataFrame(
        {"feature_id": genes, "feature_name": [f"SYN{i}" for i in range(len(genes))]},
        index=pd.Index(genes, name="gene"),
    )
    obs = pd.DataFrame(index=pd.Index([f"{prefix}_{i:06d}" for i in range(counts.shape[0])]))
    ad.AnnData(X=counts, obs=obs, var=var).write_h5ad(path)


def build(
    out,
    n_cells: int = 2000,
    n_valid: int = 200,
    n_genes: int = NUM_GENES,
    seed: int = 0,
    median_genes: int = MEDIAN_GENES_PER_CELL,
) -> dict:
    """Write the sample set into `out` (replacing what is there); returns a summary."""
    from bionemo.data.cells_scdl import h5ad_to_scdl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, n_genes)
    propensity = np.exp(PROPENSITY_SIGMA * z)
    level = np.exp(0.8 * z + rng.normal(0.0, LEVEL_SIGMA, n_genes))  # detected genes are higher
    genes = gene_ids(n_genes)

    train = synthetic_counts(rng, n_cells, propensity, level, median_genes)
    valid = synthetic_counts(rng, n_valid, propensity, level, median_genes)
    medians = gene_medians(train)

    (out / "h5ad").mkdir(exist_ok=True)
    for split, counts in (("train", train), ("valid", valid)):
        h5ad = out / "h5ad" / f"{split}.h5ad"
        write_h5ad(h5ad, counts, genes, split)
        shutil.rmtree(out / split, ignore_errors=True)  # SCDL refuses to overwrite a store
        h5ad_to_scdl(h5ad, out / split, use_raw=False)

    vocab = {tok: i for i, tok in enumerate([*SAMPLE_SPECIALS, *genes])}
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n")
    # 6 significant digits: plenty for ranking, and a stable text form.
    (out / "gene_medians.json").write_text(
        json.dumps({g: float(f"{m:.6g}") for g, m in zip(genes, medians)}, indent=0) + "\n"
    )
    per_cell = np.diff(train.indptr)
    return {
        "train_cells": n_cells,
        "valid_cells": n_valid,
        "vocab_size": len(vocab),
        "median_genes_per_cell": int(np.median(per_cell)),
        "truncated_fraction": float((per_cell > 2047).mean()),  # 2047 genes fit after <cls>
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cells", type=int, default=2000, help="training cells")
    parser.add_argument("--valid-cells", type=int, default=200)
    parser.add_argument("--genes", type=int, default=NUM_GENES, help="genes in the vocabulary")
    parser.add_argument(
        "--genes-per-cell",
        type=int,
        default=MEDIAN_GENES_PER_CELL,
        help="median number of expressed genes per cell",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    s = build(args.out, args.cells, args.valid_cells, args.genes, args.seed, args.genes_per_cell)
    print(
        f"{s['train_cells']} train + {s['valid_cells']} valid cells, vocabulary of "
        f"{s['vocab_size']} tokens, median {s['median_genes_per_cell']} genes per cell "
        f"({s['truncated_fraction']:.0%} truncated at 2048 tokens) -> {args.out} "
        f"in {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
