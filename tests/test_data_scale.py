"""The memory-mapped cluster index (bionemo.data.dataset.ClusterIndex): same samples as reading
the parquet, rebuilt when the parquet changes, one valid index when processes build it at once."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.data_scale import generate as generate_synthetic
from bionemo.config import DataConfig
from bionemo.data.dataset import ClusterIndex, MLMDataset, ProteinClusters, _flatten
from bionemo.data.prep import prepare
from bionemo.data.sample import generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    fasta, tsv = generate(out, n_clusters=150, seed=2)
    prepare(fasta, out, tsv, valid_fraction=0.1, seed=2)
    # Several row groups, so the index is built from more than one (in order, by threads).
    table = pq.read_table(out / "train_clusters.parquet")
    pq.write_table(table, out / "train_clusters.parquet", row_group_size=16)
    return out


def clusters(d: Path, split: str = "train", **kw) -> ProteinClusters:
    column = "ur90_id" if split == "train" else "ur50_id"
    return ProteinClusters(d / f"{split}_clusters.parquet", d / "proteins.sqlite", column, **kw)


def index_dir(d: Path, split: str = "train") -> Path:
    column = "ur90_id" if split == "train" else "ur50_id"
    return d / f"{split}_clusters.parquet.{column}.index"


def samples(c: ProteinClusters, n: int, shuffle: bool = True) -> list:
    cfg = DataConfig(train_clusters=Path("x"), valid_clusters=None, database=Path("x"))
    ds = MLMDataset(c, 64, cfg, seed=11, shuffle=shuffle)
    return [ds[g] for g in range(n)]


@pytest.mark.parametrize("split", ["train", "valid"])
def test_memory_mapped_index_gives_the_parquet_samples(sample_dir, split):
    mapped, read = clusters(sample_dir, split), clusters(sample_dir, split, memory_map=False)
    assert (index_dir(sample_dir, split) / "meta.json").is_file()
    assert isinstance(mapped.id_bytes, np.memmap) and not isinstance(read.id_bytes, np.memmap)
    for a, b in zip(
        (mapped.offsets, mapped.id_offsets, mapped.id_bytes),
        (read.offsets, read.id_offsets, read.id_bytes),
    ):
        assert np.array_equal(a, b)
    table = pq.read_table(sample_dir / f"{split}_clusters.parquet").to_pydict()
    listed = table["ur90_id"] if split == "train" else [[i] for i in table["ur50_id"]]
    assert [mapped[c] for c in range(len(mapped))] == listed
    n = 2 * len(mapped) + 5  # across an epoch boundary
    for x, y in zip(samples(mapped, n, split == "train"), samples(read, n, split == "train")):
        assert np.array_equal(x["input_ids"], y["input_ids"])
        assert np.array_equal(x["labels"], y["labels"])


def test_pickled_clusters_map_the_index_again(sample_dir):
    c = clusters(sample_dir)
    copy = pickle.loads(pickle.dumps(c))  # what a spawn-started DataLoader worker receives
    assert len(pickle.dumps(c)) < 4096  # the arrays do not travel
    assert isinstance(copy.id_bytes, np.memmap)
    assert [copy[i] for i in range(len(c))] == [c[i] for i in range(len(c))]


def test_a_changed_parquet_rebuilds_the_index(tmp_path, sample_dir):
    d = tmp_path / "data"
    d.mkdir()
    (d / "proteins.sqlite").symlink_to(sample_dir / "proteins.sqlite")
    table = pq.read_table(sample_dir / "train_clusters.parquet")
    pq.write_table(table, d / "train_clusters.parquet")
    first = clusters(d)
    assert len(first) == table.num_rows
    meta = json.loads((index_dir(d) / "meta.json").read_text())

    # Fewer clusters, then the same rows in another order (same size and row count).
    for changed in (table.slice(0, 40), table.take(np.arange(table.num_rows)[::-1].copy())):
        pq.write_table(changed, d / "train_clusters.parquet")
        now = clusters(d)
        assert [now[i] for i in range(len(now))] == changed.column("ur90_id").to_pylist()
        new_meta = json.loads((index_dir(d) / "meta.json").read_text())
        assert new_meta["source"] != meta["source"]
        meta = new_meta
    assert first[0] == table.column("ur90_id")[0].as_py()  # the old map stays readable
    assert sorted(p.name for p in d.iterdir()) == [
        "proteins.sqlite",
        "train_clusters.parquet",
        "train_clusters.parquet.ur90_id.index",
        "train_clusters.parquet.ur90_id.index.lock",
    ]


def test_a_damaged_index_or_a_dead_builders_leftovers_are_replaced(tmp_path):
    parquet = generate_synthetic(tmp_path, n_clusters=500, n_ids=1500)
    index = ClusterIndex(parquet, "ur90_id", "data.train_clusters")
    expected = [a.copy() for a in index.open()]
    (index.path / "id_bytes.bin").write_bytes(b"truncated")  # e.g. a disk that filled up
    leftover = index.path.parent / f"{index.path.name}.tmp-deadhost-99999"
    leftover.mkdir()
    (leftover / "id_bytes.bin").write_bytes(b"half")
    for a, b in zip(ClusterIndex(parquet, "ur90_id", "data.train_clusters").open(), expected):
        assert np.array_equal(a, b)
    assert not leftover.exists()


RACER = """
import hashlib, os, sys
from pathlib import Path
from bionemo.data.dataset import ClusterIndex
parquet = Path(sys.argv[1])
arrays = ClusterIndex(parquet, "ur90_id", "data.train_clusters").open()
digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
print(digest, os.stat(parquet.parent / (parquet.name + ".ur90_id.index") / "meta.json").st_ino)
"""


def blocked_on_flock(pids) -> set[int]:
    """The pids waiting for a flock ("->" lines of /proc/locks)."""
    waiting = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields:
            waiting.add(int(fields[fields.index("->") + 4]))
    return waiting & set(pids)


def test_processes_building_at_once_leave_one_valid_index(tmp_path):
    parquet = generate_synthetic(tmp_path, n_clusters=50_000, n_ids=150_000)
    lock_path = tmp_path / "train_clusters.parquet.ur90_id.index.lock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(lock_path, "a") as lock:
        # Hold the lock until both processes wait for it: both then find no index and race to
        # build it; the lock must let one build while the other waits.
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, str(parquet)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 120
        while blocked_on_flock(p.pid for p in procs) != {p.pid for p in procs}:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the processes never waited for the lock"
            time.sleep(0.05)
        assert not list(tmp_path.glob("*.tmp-*"))  # nobody builds while the lock is held
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    (digest_a, inode_a), (digest_b, inode_b) = (out.split() for out, _ in outs)
    assert inode_a == inode_b  # one index, mapped by both

    column = pq.read_table(parquet, columns=["ur90_id"]).column(0)  # the parquet path's arrays
    expected = b"".join(a.tobytes() for a in _flatten(column, "k", parquet, "ur90_id"))
    assert digest_a == digest_b == hashlib.sha256(expected).hexdigest()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "train_clusters.parquet",
        "train_clusters.parquet.ur90_id.index",
        "train_clusters.parquet.ur90_id.index.lock",
    ]  # no tmp folder left


def test_bad_rows_are_refused_and_leave_no_index(tmp_path, sample_dir):
    path = tmp_path / "train_clusters.parquet"
    pq.write_table(pa.table({"ur90_id": [["UniRef90_a"], [], ["UniRef90_b"]]}), path)
    with pytest.raises(ValueError, match="data.train_clusters.*empty clusters"):
        ProteinClusters(path, sample_dir / "proteins.sqlite")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train_clusters.parquet",
        "train_clusters.parquet.ur90_id.index.lock",
    ]
