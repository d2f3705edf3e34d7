"""BioNeMo's SCDL (single-cell data loader) format, through NVIDIA's `bionemo-scdl` package.

An SCDL store is a folder of memory-mapped arrays of one CSR count matrix (data.npy: values,
col_ptr.npy: column of each value, row_ptr.npy: row offsets) plus metadata.json, a header and the
AnnData `var` table as parquet (var_features/): one row is one cell, read without loading the rest.
It is built from AnnData .h5ad files; for many files, the package's own `convert_h5ad_to_scdl`
command concatenates them.

The package installs into the `bionemo` namespace (`bionemo.scdl`), which this repository's own
`bionemo` package shadows; `scdl()` extends our package's search path to the installed namespace
portion first (a no-op once bionemo/__init__.py does it itself).

Training opens a store with `open_scdl`, not the package's own load: that load also reads the
store's obs table (obs_features/, one row per cell) into every process as numpy object arrays:
with one obs column, 2 GiB per rank at 20M cells, more with CELLxGENE's dozens of columns (see
benchmarks/results/data_scale.md); nothing here uses obs. bionemo-scdl 0.1.3 has no option to
skip it, so `open_scdl`'s subclass replaces `load` with one that maps the three count arrays
(read-only; the pages are shared by the processes of a node) and reads the var table only.
"""

from __future__ import annotations

import functools
import json
import pkgutil
from pathlib import Path

import numpy as np

# var columns that may hold the Ensembl ids, in order of preference: CELLxGENE's and BioNeMo's
# `feature_id`, then common alternatives, then SCDL's name for a bare var index.
FEATURE_ID_COLUMNS = ("feature_id", "ensembl_id", "gene_ids", "var_feature_id")

_INSTALL = "pip install bionemo-scdl (it brings anndata, scipy, pandas; see docs/geneformer.md)"

# The store layout open_scdl reads: header.sch schema major version, and the dtypes each count
# array may have (bionemo-scdl 0.1.3 writes the smallest that holds the values: any unsigned
# width for the offsets). Anything else is refused, not guessed at.
SCHEMA_MAJOR = 0
_UINTS = ("uint8", "uint16", "uint32", "uint64")
_ARRAY_DTYPES = {
    "DATA": (*_UINTS, "float16", "float32", "float64"),
    "ROWPTR": _UINTS,
    "COLPTR": _UINTS,
}
_RECONVERT = "convert the .h5ad files again with bionemo-scdl 0.1.3 (`convert_h5ad_to_scdl`)"


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
    """Open an existing store for reading: the count arrays mapped read-only, the var table
    loaded, the obs table never read (see the module docstring). Rows, values and var features are
    the package's own load's; `obs_features()` is empty."""
    return _counts_store()(str(path))


@functools.cache
def _counts_store():
    """SingleCellMemMapDataset with a `load` that skips obs (defined once the package imports)."""
    from bionemo.scdl.index.row_feature_index import VariableFeatureIndex
    from bionemo.scdl.util.scdl_constants import FileNames

    class CountsStore(scdl()):
        def load(self, stored_path: str) -> None:
            store = Path(stored_path)
            self.data_path, self.header = stored_path, _check_header(store)
            self.metadata = _read_json(store / "metadata.json")
            if not (store / "var_features").is_dir():
                raise ValueError(f"{store / 'var_features'}: missing; {_RECONVERT}")
            self._var_feature_index = VariableFeatureIndex.load(str(store / "var_features"))
            self.data, self.row_index, self.col_index = _count_arrays(store, self.header)
            arrays = {"DATA": self.data, "ROWPTR": self.row_index, "COLPTR": self.col_index}
            for name, array in arrays.items():  # as the package's load sets them
                self.dtypes[FileNames[name].value] = array.dtype.name
            rows = self.metadata.get("num_rows") if isinstance(self.metadata, dict) else None
            if rows != len(self.row_index) - 1:
                raise ValueError(
                    f"{store / 'metadata.json'}: num_rows is {rows} but row_ptr.npy holds "
                    f"{len(self.row_index) - 1} rows; {_RECONVERT}"
                )

    return CountsStore


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable as JSON ({e}); {_RECONVERT}") from e


def _check_header(store: Path):
    """The store's header.sch, if it is a layout open_scdl knows (schema 0.x, memmap backend)."""
    from bionemo.scdl.schema.header import SCDLHeader
    from bionemo.scdl.util.scdl_constants import Backend

    path = store / "header.sch"
    if not path.is_file():  # the package guesses dtypes then; a wrong guess reads garbage
        raise ValueError(f"{path}: missing (the count arrays' dtypes are unknown); {_RECONVERT}")
    try:
        header = SCDLHeader.load(str(path))
    except Exception as e:  # the package wraps every failure in its own error type
        raise ValueError(f"{path}: not an SCDL header ({e}); {_RECONVERT}") from e
    if header.version.major != SCHEMA_MAJOR or header.backend != Backend.MEMMAP_V0:
        raise ValueError(
            f"{path}: schema {header.version}, backend {header.backend.name}: only schema "
            f"{SCHEMA_MAJOR}.x with the MEMMAP_V0 backend is known here; {_RECONVERT}"
        )
    return header


def _count_arrays(store: Path, header) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, row_ptr, col_ptr), mapped read-only, after checking each file against the header:
    a known dtype, a size of exactly length x itemsize, and row_ptr spanning the values."""
    from bionemo.scdl.util.scdl_constants import FileNames

    arrays = {a.name: a for a in header.arrays}
    out = {}
    for name, allowed in _ARRAY_DTYPES.items():
        file = store / FileNames[name].value
        info = arrays.get(name)
        dtype = info.dtype.numpy_dtype_string if info else None
        if dtype not in allowed:
            raise ValueError(
                f"{file}: header.sch gives dtype {dtype} (expected one of {', '.join(allowed)}); "
                f"{_RECONVERT}"
            )
        size = file.stat().st_size if file.is_file() else None
        if size != info.length * np.dtype(dtype).itemsize:
            raise ValueError(
                f"{file}: {size} bytes, but header.sch gives {info.length} x {dtype}; {_RECONVERT}"
            )
        out[name] = np.memmap(file, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    data, rows, cols = out["DATA"], out["ROWPTR"], out["COLPTR"]
    if len(data) != len(cols) or not len(rows) or int(rows[-1]) != len(data):
        raise ValueError(
            f"{store / 'row_ptr.npy'}: ends at {int(rows[-1]) if len(rows) else None}, but the "
            f"store has {len(data)} values and {len(cols)} columns; {_RECONVERT}"
        )
    return data, rows, cols


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
