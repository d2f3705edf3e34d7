"""open_scdl (bionemo.data.cells_scdl): the trainer's SCDL store without the per-cell obs table.

bionemo-scdl's own load reads obs (one row per cell) into every process; open_scdl must give the
same rows, genes and tokens while holding nothing per cell, and refuse layouts it does not know.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.data_scale import library_cells, scdl_generate
from bionemo.data.cells import ScdlCells
from bionemo.data.cells_scdl import feature_ids, open_scdl, scdl
from bionemo.data.cells_tokenizer import GeneVocab, load_gene_medians

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "geneformer_sample"
N_CELLS = 500  # first cells compared (of the sample's 2,000)
MANY_CELLS = 30_000  # more cells than the var table has genes (25,421): per-cell arrays stand out

pytestmark = pytest.mark.skipif(
    not (SAMPLE / "train" / "metadata.json").is_file(),
    reason="no Geneformer sample store (make data MODEL=geneformer_10m)",
)


@pytest.fixture(scope="module")
def vocab():
    return GeneVocab.load(SAMPLE / "vocab.json")


def cells(cls, store: Path, vocab: GeneVocab):
    medians = load_gene_medians(SAMPLE / "gene_medians.json", vocab)
    return cls(store, vocab, medians, 2048, 10_000.0, "data.train")


@pytest.fixture
def store_copy(tmp_path):
    """A copy of the sample store (25 MB) the test may damage."""
    out = tmp_path / "train"
    shutil.copytree(SAMPLE / "train", out)
    return out


def per_cell_arrays(obj, n_cells: int, seen=None) -> list[str]:
    """Paths to numpy arrays held in memory (not memory-mapped) with n_cells or more elements,
    found through obj's attributes, dicts and lists."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.memmap):
        return []
    if isinstance(obj, np.ndarray):
        return ["array"] if obj.size >= n_cells else []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("bionemo"):
        items = vars(obj).items()
    else:
        return []
    return [f"{k}.{p}" for k, v in items for p in per_cell_arrays(v, n_cells, seen)]


def test_open_scdl_gives_the_library_rows_genes_and_tokens(vocab):
    """Same (gene ids, values) per cell and the same tokens as bionemo-scdl's own load."""
    mine, theirs = open_scdl(SAMPLE / "train"), scdl()(str(SAMPLE / "train"))
    assert mine.number_of_rows() == theirs.number_of_rows() == 2000
    genes_mine, genes_theirs = feature_ids(mine, 0, "k"), feature_ids(theirs, 0, "k")
    assert np.array_equal(genes_mine, genes_theirs)
    new = cells(ScdlCells, SAMPLE / "train", vocab)
    old = cells(library_cells(), SAMPLE / "train", vocab)
    assert type(new.store()) is not type(old.store())  # two code paths compared, not one
    for cell in range(N_CELLS):
        (v1, c1), _, _ = mine.get_row(cell)
        (v2, c2), _, _ = theirs.get_row(cell)
        assert v1.dtype == v2.dtype and np.array_equal(v1, v2), cell
        assert np.array_equal(genes_mine[c1], genes_theirs[c2]), cell
        assert np.array_equal(new.tokens(cell), old.tokens(cell)), cell


def test_open_scdl_holds_nothing_per_cell_and_never_reads_obs(tmp_path, vocab):
    """The library's load keeps per-cell obs arrays in the process; open_scdl keeps none (the
    count arrays are memory maps), and opens a store whose obs parquet is unreadable."""
    store = scdl_generate(SAMPLE, tmp_path / "many", MANY_CELLS, genes=4)
    held = per_cell_arrays(scdl()(str(store)), MANY_CELLS)
    assert held and all(p.startswith("_obs_feature_index.") for p in held)  # the check sees obs
    ours = open_scdl(store)
    assert per_cell_arrays(ours, MANY_CELLS) == []
    assert all(isinstance(a, np.memmap) for a in (ours.data, ours.row_index, ours.col_index))
    assert not ours.data.flags.writeable  # read-only maps: no write permission needed
    (store / "obs_features" / "dataframe_0.parquet").write_bytes(b"not parquet")
    with pytest.raises(Exception):
        scdl()(str(store))
    new = cells(ScdlCells, store, vocab)
    assert len(new) == MANY_CELLS and len(new.tokens(MANY_CELLS - 1)) == 5  # <cls> + 4 genes


@pytest.mark.parametrize(
    "damage, file, words",
    [
        (lambda s: (s / "header.sch").unlink(), "header.sch", "missing"),
        (lambda s: (s / "header.sch").write_bytes(b"garbage"), "header.sch", "not an SCDL header"),
        (lambda s: truncate(s / "data.npy", 4), "data.npy", "bytes, but header.sch gives"),
        (lambda s: truncate(s / "col_ptr.npy", 2), "col_ptr.npy", "bytes, but header.sch gives"),
        (lambda s: (s / "metadata.json").write_text('{"num_rows": 3}'), "metadata.json", "3"),
        (lambda s: set_major(s, 1), "header.sch", "schema 1.1.0"),
        (lambda s: set_header(s, "float64"), "data.npy", "bytes, but header.sch gives"),
    ],
)
def test_open_scdl_refuses_unknown_layouts(store_copy, damage, file, words):
    damage(store_copy)
    with pytest.raises(ValueError) as e:
        open_scdl(store_copy)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(store_copy / file)), message
    assert words in message and "convert" in message, message


def truncate(path: Path, nbytes: int) -> None:
    path.write_bytes(path.read_bytes()[:-nbytes])


def set_header(store: Path, dtype: str) -> None:
    from bionemo.scdl.schema.header import SCDLHeader
    from bionemo.scdl.util.scdl_constants import ArrayDType

    header = SCDLHeader.load(str(store / "header.sch"))
    header.get_array("DATA").dtype = next(d for d in ArrayDType if d.numpy_dtype_string == dtype)
    header.save(str(store / "header.sch"))


def set_major(store: Path, major: int) -> None:
    """A header from a future schema (the package refuses to write one: patch the byte after the
    4-byte magic number)."""
    raw = bytearray((store / "header.sch").read_bytes())
    assert raw[:4] == b"SCDL"
    raw[4] = major
    (store / "header.sch").write_bytes(bytes(raw))
