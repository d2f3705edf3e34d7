"""BioNeMo's SCDL (single-cell data loader) format, through NVIDIA's `bionemo-scdl` package.

An SCDL store is a folder of memory-mapped arrays of one CSR count matrix (data.npy: values,
col_ptr.npy: column of each value, row_ptr.npy: row offsets) plus metadata.json, a header and the
AnnData `var` table as parquet (var_features/): one row is one cell, read without loading the rest.
It is built from AnnData .h5ad files; for many files, the package's own `convert_h5ad_to_scdl`
command concatenates them.

The package installs into the `bionemo` namespace (`bionemo.scdl`), which this repository's own
`bionemo` package shadows; `scdl()` extends our package's search path to the installed namespace
portion first (a no-op once bionemo/__init__.py does it itself).
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

# var columns that may hold the Ensembl ids, in order of preference: CELLxGENE's and BioNeMo's
# `feature_id`, then common alternatives, then SCDL's name for a bare var index.
FEATURE_ID_COLUMNS = ("feature_id", "ensembl_id", "gene_ids", "var_feature_id")

_INSTALL = "pip install bionemo-scdl (it brings anndata, scipy, pandas; see docs/geneformer.md)"


def scdl():
    """The SingleCellMemMapDataset class of bionemo-scdl (imports anndata: about a second)."""
    import bionemo

    bionemo.__path__ = pkgutil.extend_path(bionemo.__path__, bionemo.__name__)
    try:
        from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset
    except ImportError as e:
        raise ImportError(f"SCDL data needs the bionemo-scdl package ({e}); {_INSTALL}") from e
    return SingleCellMemMapDataset


def h5ad_to_scdl(h5ad: Path, out: Path, use_raw: bool | None = None) -> int:
    """Convert one .h5ad file (raw counts, sparse) into an SCDL store at `out`; returns #cells.

    use_raw: read adata.raw.X (SCDL's default) or adata.X; None: raw.X when the file has it.
    """
    if use_raw is None:
        import h5py

        with h5py.File(h5ad, "r") as f:
            use_raw = "raw" in f and "X" in f["raw"]
    ds = scdl()(str(out), h5ad_path=str(h5ad), use_X_not_raw=not use_raw)
    return ds.number_of_rows()


def open_scdl(path: Path):
    """Open an existing store, read only in spirit (SCDL maps the arrays r+: the files must be
    writable by the user, though nothing is written)."""
    return scdl()(str(path))


def feature_ids(ds, row: int, key: str):
    """The Ensembl ids of the columns of `row`'s block (one block per source .h5ad)."""
    for name in FEATURE_ID_COLUMNS:
        try:
            return ds.var_features().lookup(row, select_features=[name])[0][0]
        except ValueError:  # SCDL's answer for a column the block does not have
            continue
    blocks = getattr(ds.var_features(), "_feature_arr", None) or [{}]  # for the message only
    raise ValueError(
        f"{key}: the SCDL store has no var column with Ensembl ids (looked for "
        f"{', '.join(FEATURE_ID_COLUMNS)}; it has {sorted(blocks[0])}); set var['feature_id'] to "
        f"the Ensembl ids in the .h5ad and convert it again"
    )
