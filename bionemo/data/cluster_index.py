"""The memory-mapped cluster index: a clusters parquet column converted once into flat arrays
that every process of a node maps read-only (ClusterIndex), and the Arrow flattening it shares
with bionemo.data.dataset (_flatten)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# The memory-mapped cluster index (see ClusterIndex). Bump when the layout changes: an index of
# another version is rebuilt.
INDEX_VERSION = 1
_INDEX_FILES = {"offsets": np.int64, "id_offsets": np.int64, "id_bytes": np.uint8}
_INDEX_THREADS = 8  # parquet row groups decoded at once while building an index


def _flatten(col, key: str, path: Path, column: str):
    """(offsets, id_offsets, id_bytes) of a clusters column (string or list of strings), numpy
    views of the Arrow buffers where possible: member j of cluster i is the id
    id_bytes[id_offsets[k] : id_offsets[k + 1]], k = offsets[i] + j; all three start at 0."""
    if col.null_count:
        raise ValueError(
            f"{key}: column {column!r} of {path} has {col.null_count} null rows; drop them"
        )
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        ids = col.cast(pa.large_string())
        ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        offsets = np.arange(len(ids) + 1, dtype=np.int64)  # one member per cluster
    else:  # a list of strings (the schema was checked)
        lists = col.cast(pa.large_list(pa.large_string()))
        lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
        offsets = lists.offsets.to_numpy()
        if len(lists) and np.diff(offsets).min() == 0:
            raise ValueError(f"{key}: {path} has empty clusters in {column!r}; drop them")
        ids = lists.values
    if ids.null_count:
        raise ValueError(f"{key}: column {column!r} of {path} has null member ids; drop them")
    _, id_offsets_buf, data_buf = ids.buffers()
    if len(ids):
        id_offsets = np.frombuffer(id_offsets_buf, np.int64)[ids.offset : ids.offset + len(ids) + 1]
    else:  # Arrow may give an empty array no buffers
        id_offsets = np.zeros(1, np.int64)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lo, hi = int(offsets[0]), int(offsets[-1])
    if lo:  # a slice: rebase (no copy in the common whole-array case)
        offsets = offsets - lo
    id_offsets = id_offsets[lo : hi + 1]
    first, last = int(id_offsets[0]), int(id_offsets[-1])
    if first:
        id_offsets = id_offsets - first
    return offsets, id_offsets, data[first:last]


def _source_key(path: Path) -> dict:
    """What identifies a parquet file's content for the index: its size, mtime and a hash of its
    footer (the file metadata: row groups, their sizes and offsets). Any change rebuilds."""
    st = path.stat()
    with open(path, "rb") as f:
        f.seek(max(st.st_size - 8, 0))
        tail = f.read(8)
        footer_len = int.from_bytes(tail[:4], "little") if len(tail) == 8 else 0
        f.seek(max(st.st_size - 8 - footer_len, 0))
        footer = f.read(footer_len + 8)
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "footer_sha256": hashlib.sha256(footer).hexdigest(),
    }


class ClusterIndex:
    """A clusters parquet column converted once into flat arrays that every process memory-maps.

    Reading the parquet gives each rank a private copy of the id table (about 6 GB for UniRef90's
    ~200M ids), so memory per node grows with the ranks per node and start-up with the table's
    size. The index holds the same three arrays as `_flatten` in raw files (offsets.bin,
    id_offsets.bin, id_bytes.bin) plus meta.json; ranks map them read-only, so their pages live
    once in the page cache however many ranks read them, and opening takes milliseconds.

    Location: `<parquet>.<column>.index/` beside the parquet, or, when that folder is not
    writable, under $XDG_CACHE_HOME/bionemo/cluster-index/. meta.json records the parquet's size,
    mtime and footer hash; an index that does not match is rebuilt. The first process takes an
    exclusive flock on `<index>.lock`, builds into `<index>.tmp-<host>-<pid>/` and renames it into
    place; the others wait on the lock and then map the finished index. A builder that dies
    releases the lock and leaves only a tmp folder, which the next builder removes.
    """

    def __init__(self, parquet: Path, column: str, key: str):
        self.parquet, self.column, self.key = parquet, column, key
        beside = parquet.parent / f"{parquet.name}.{column}.index"
        if self._valid(beside) or os.access(parquet.parent, os.W_OK):
            self.path = beside
        else:
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            tag = hashlib.sha256(str(parquet.resolve()).encode()).hexdigest()[:16]
            self.path = cache / "bionemo" / "cluster-index" / tag / beside.name

    def open(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three arrays, memory-mapped read-only; builds (or rebuilds) the index first."""
        if not self._valid(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(f"{self.path}.lock", "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, or if the process dies
                    locked = True
                except OSError:  # a file system without flock (Lustre mounted noflock): the
                    locked = False  # rename below still leaves one whole index, built twice
                if not self._valid(self.path):  # another process may have built it meanwhile
                    self._build(locked)
        return self.map(self.path)

    @staticmethod
    def map(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arrays = []
        for name, dtype in _INDEX_FILES.items():
            file = path / f"{name}.bin"
            if file.stat().st_size == 0:  # mmap refuses empty files
                arrays.append(np.zeros(0, dtype))
            else:
                arrays.append(np.memmap(file, dtype=dtype, mode="r"))
        return tuple(arrays)

    def _valid(self, path: Path) -> bool:
        try:
            meta = json.loads((path / "meta.json").read_text())
            sizes = {name: (path / f"{name}.bin").stat().st_size for name in _INDEX_FILES}
        except (OSError, ValueError):
            return False
        return (
            meta.get("version") == INDEX_VERSION
            and meta.get("column") == self.column
            and meta.get("source") == _source_key(self.parquet)
            and sizes
            == {
                name: meta["counts"][name] * np.dtype(dtype).itemsize
                for name, dtype in _INDEX_FILES.items()
            }
        )

    def _build(self, locked: bool) -> None:
        parent, name = self.path.parent, self.path.name
        if locked:  # no other builder runs: what a dead one left can go
            for stale in [*parent.glob(f"{name}.tmp-*"), *parent.glob(f"{name}.old-*")]:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f"{name}.tmp-{socket.gethostname()}-{os.getpid()}"
        tmp.mkdir()
        try:
            source = _source_key(self.parquet)
            counts = self._convert(tmp)
            (tmp / "meta.json").write_text(
                json.dumps(
                    {
                        "version": INDEX_VERSION,
                        "column": self.column,
                        "source": source,
                        "counts": counts,
                    },
                    indent=1,
                )
            )
            if _source_key(self.parquet) != source:
                raise ValueError(
                    f"{self.key}: {self.parquet} changed while it was being "
                    f"indexed; start again once the file is written"
                )
            if self._valid(self.path):  # built meanwhile by a process that had no lock either
                shutil.rmtree(tmp)
                return
            if self.path.exists():  # a stale index: move it aside; processes mapping it keep it
                old = parent / f"{name}.old-{socket.gethostname()}-{os.getpid()}"
                os.rename(self.path, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _convert(self, out: Path) -> dict[str, int]:
        """Write the three files, row group by row group in order; returns their element counts.

        Row groups are decoded by a few threads at once (Arrow releases the GIL), at most
        `workers` of them in memory at a time.
        """

        def read(i: int):
            table = pq.ParquetFile(self.parquet).read_row_group(i, columns=[self.column])
            return _flatten(table.column(0), self.key, self.parquet, self.column)

        files = {name: open(out / f"{name}.bin", "wb") for name in _INDEX_FILES}
        counts = {"offsets": 1, "id_offsets": 1, "id_bytes": 0}
        members = nbytes = 0
        workers = min(_INDEX_THREADS, os.cpu_count() or 1)
        try:
            files["offsets"].write(np.zeros(1, np.int64))
            files["id_offsets"].write(np.zeros(1, np.int64))
            with ThreadPoolExecutor(workers) as pool:
                groups = range(pq.ParquetFile(self.parquet).num_row_groups)
                pending = deque(pool.submit(read, i) for i in groups[:workers])
                for i in groups:
                    offsets, id_offsets, data = pending.popleft().result()
                    if i + workers < len(groups):
                        pending.append(pool.submit(read, i + workers))
                    files["offsets"].write(offsets[1:] + members)
                    files["id_offsets"].write(id_offsets[1:] + nbytes)
                    files["id_bytes"].write(data)
                    counts["offsets"] += len(offsets) - 1
                    counts["id_offsets"] += len(id_offsets) - 1
                    counts["id_bytes"] += len(data)
                    members, nbytes = members + int(offsets[-1]), nbytes + len(data)
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        finally:
            for f in files.values():
                f.close()
            pa.default_memory_pool().release_unused()  # Arrow keeps freed blocks otherwise
        return counts
