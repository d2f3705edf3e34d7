"""UniRef-scale ESM-2 data: start-up time and memory per rank, parquet read vs memory-mapped index.

    python -m benchmarks.data_scale generate --out DIR [--clusters 60000000] [--ids 200000000]
    python -m benchmarks.data_scale measure --data DIR \
        [--runs parquet:1,parquet:8,mmap-cold:8,mmap:1,mmap:8] [--samples 256] [--json OUT.json] \
        [--mem-limit-gib 128] [--deadline-s 600]
    python -m benchmarks.data_scale scdl-generate --out DIR [--cells 20000000] [--genes-per-cell 8]
    python -m benchmarks.data_scale measure --data DIR --runs scdl-library:1,scdl:1,scdl:8

`generate` writes DIR/train_clusters.parquet in BioNeMo's layout (ur50_id, ur90_id: a list of
member ids per UniRef50 cluster) with the given counts: cluster sizes are 1 plus a Pareto(2) share
of the remaining ids (most clusters small, a few with thousands of members, as in UniRef50); ids
are fixed-width ("UniRef90_0000000042", 19 bytes, the length of a 10-character UniProt accession).
No sequences are stored: SyntheticProteins derives each from a hash of its id, so no 200M-row
SQLite file is needed. This stand-in lives here, not in bionemo/: it is for benchmarks only.

`scdl-tile` makes a larger Geneformer SCDL store by repeating a small one's cells; `scdl-generate`
makes one of any number of cells with a few random genes each (tens of millions of cells in a few
GB), plus an obs table of one cell id per cell. `measure`'s `scdl` path opens the store as the
trainer does (bionemo.data.cells_scdl.open_scdl: obs never read); `scdl-library` opens it with
bionemo-scdl's own load, which reads obs into every rank (the code path before open_scdl).

`measure` starts R rank processes at once for each run (path:R; "mmap-cold" deletes the index
first, so one rank builds it while the others wait on its lock). Each rank builds the dataset as
the trainer does (ProteinClusters + MLMDataset, seq_length 1024), reads its first sample (which
draws the epoch's permutation) and --samples more of its own, then all ranks, still alive, read
/proc/self/smaps_rollup: RSS counts every page a rank maps, PSS divides shared pages among the
processes that map them (so the sum of PSS over ranks counts a page once), USS is the rank's
private pages. Memory-mapped ranks then touch every page of the index (what a full epoch does)
and measure again. The parent samples the ranks' summed PSS every 0.25 s for the node's peak and
stops a run whose node is about to run out of memory (MemAvailable under 1 GiB for a second),
recording that; a parquet run whose 1-rank peak RSS times the ranks exceeds 90% of --mem-limit-gib
is not started, and the prediction is recorded instead.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from launchers.paths import project_commit

TRAIN_FILE = "train_clusters.parquet"
COLUMN = "ur90_id"
ID_DIGITS = 10
ROW_GROUP_CLUSTERS = 1 << 20
PARETO_SHAPE = 2.0  # cluster size tail: the largest of 60M clusters gets ~20k members
SEQ_LENGTH = 1024
MICRO_BATCH = 8
LOW_MEMORY_BYTES = 1 << 30  # stop a run before the node runs out (MemAvailable below this...)
LOW_MEMORY_SAMPLES = 4  # ...for this many samples in a row: some VMs grow their memory on demand
GiB = 1 << 30


# ------------------------------------------------------------------------------------- generate
def fixed_ids(prefix: str, first: int, n: int):
    """n string ids prefix + zero-padded decimal first..first+n-1, built without Python loops."""
    import pyarrow as pa

    k = np.arange(first, first + n, dtype=np.int64)
    head = np.frombuffer(prefix.encode(), np.uint8)
    width = len(head) + ID_DIGITS
    buf = np.empty((n, width), np.uint8)
    buf[:, : len(head)] = head
    for d in range(width - 1, len(head) - 1, -1):
        buf[:, d] = 48 + k % 10
        k //= 10
    offsets = np.arange(n + 1, dtype=np.int32) * width
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf))


def cluster_sizes(n_clusters: int, n_ids: int, seed: int) -> np.ndarray:
    if n_ids < n_clusters:
        raise SystemExit(f"--ids ({n_ids}) must be at least --clusters ({n_clusters})")
    rng = np.random.default_rng(seed)
    weights = rng.pareto(PARETO_SHAPE, n_clusters)
    sizes = 1 + np.floor(weights * ((n_ids - n_clusters) / weights.sum())).astype(np.int64)
    del weights
    short = n_ids - int(sizes.sum())  # rounding: give the rest one each to random clusters
    sizes += np.bincount(rng.integers(0, n_clusters, short), minlength=n_clusters)
    return sizes


def generate(out, n_clusters: int, n_ids: int, seed: int = 0) -> Path:
    """Write out/train_clusters.parquet; row groups are built by threads, written in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = cluster_sizes(n_clusters, n_ids, seed)
    firsts = np.concatenate(([0], np.cumsum(sizes)))  # the first member of each cluster
    schema = pa.schema([("ur50_id", pa.string()), (COLUMN, pa.list_(pa.string()))])

    def row_group(first: int):
        n = min(ROW_GROUP_CLUSTERS, n_clusters - first)
        offsets = (firsts[first : first + n + 1] - firsts[first]).astype(np.int32)
        members = fixed_ids("UniRef90_", int(firsts[first]), int(offsets[-1]))
        lists = pa.ListArray.from_arrays(pa.array(offsets), members)
        return pa.table([fixed_ids("UniRef50_", first, n), lists], schema=schema)

    path, tmp = out / TRAIN_FILE, out / f".{TRAIN_FILE}.tmp"
    workers = min(8, os.cpu_count() or 1)
    with (
        pq.ParquetWriter(tmp, schema, compression="snappy", use_dictionary=False) as writer,
        ThreadPoolExecutor(workers) as pool,
    ):
        starts = range(0, n_clusters, ROW_GROUP_CLUSTERS)
        pending = deque(pool.submit(row_group, f) for f in starts[:workers])
        for i in range(len(starts)):
            table = pending.popleft().result()
            if i + workers < len(starts):
                pending.append(pool.submit(row_group, starts[i + workers]))
            writer.write_table(table, row_group_size=table.num_rows)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------- synthetic sequences
def synthetic_clusters():
    """SyntheticProteins, defined on first use (it subclasses a torch-importing module)."""
    from bionemo.data.dataset import ProteinClusters
    from bionemo.data.sample import LENGTH_SIGMA, MAX_LENGTH, MEDIAN_LENGTH, MIN_LENGTH, residues

    class SyntheticProteins(ProteinClusters):
        """ProteinClusters whose id -> sequence table is a function of the id (no database)."""

        def _check_database(self) -> None:
            pass

        def sequence(self, protein_id: str) -> str:
            digest = hashlib.blake2b(protein_id.encode(), digest_size=8).digest()
            rng = np.random.default_rng(int.from_bytes(digest, "little"))
            length = np.exp(rng.normal(np.log(MEDIAN_LENGTH), LENGTH_SIGMA))
            n = int(np.clip(round(length), MIN_LENGTH, MAX_LENGTH))
            return residues(rng, n).tobytes().decode()

    return SyntheticProteins


# --------------------------------------------------------------------------------- SCDL (cells)
def _scdl_copy(src: Path, out: Path):
    """out/train as a copy of src/train's header, var table and small files (no count arrays, no
    obs); vocab.json and gene_medians.json copied. Returns (store, header, dtypes by array)."""
    from bionemo.data.cells_scdl import scdl

    scdl()  # makes bionemo.scdl importable
    from bionemo.scdl.schema.header import SCDLHeader

    store, new = src / "train", out / "train"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(store, new, ignore=shutil.ignore_patterns("*.npy", "obs_features"))
    for name in ("vocab.json", "gene_medians.json"):
        shutil.copy(src / name, out / name)
    header = SCDLHeader.load(str(store / "header.sch"))
    return store, header, {a.name: np.dtype(a.dtype.numpy_dtype_string) for a in header.arrays}


def _scdl_finish(store: Path, new: Path, header, n_cells: int, n_values: int) -> None:
    """The header's lengths, metadata.json and both index folders (one block of n_cells rows) of a
    store whose count arrays and obs parquet are written; var_features stays src's table."""
    for array in header.arrays:
        array.length = {"ROWPTR": n_cells + 1}.get(array.name, n_values)
    header.save(str(new / "header.sch"))
    (new / "metadata.json").write_text(json.dumps({"num_rows": n_cells}))
    for index in ("var_features", "obs_features"):
        (new / index).mkdir(exist_ok=True)
        for name in ("labels.npy", "version.npy"):
            shutil.copy(store / index / name, new / index / name)
        np.save(new / index / "cumulative_sum_index.npy", np.array([-1, n_cells], dtype=np.int64))


def scdl_tile(src: Path, out: Path, copies: int) -> Path:
    """A Geneformer data folder whose SCDL store (out/train) is src/train's cells `copies` times:
    the count arrays concatenated, row offsets shifted, the obs table repeated; vocab.json and
    gene_medians.json copied. For memory and start-up figures only (the cells repeat)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store, header, dtypes = _scdl_copy(src, out)
    tiled = out / "train"
    rows = np.memmap(store / "row_ptr.npy", dtype=dtypes["ROWPTR"], mode="r")
    n_cells, n_values = len(rows) - 1, int(rows[-1])
    with open(tiled / "row_ptr.npy", "wb") as f:
        f.write(np.zeros(1, dtypes["ROWPTR"]))
        for k in range(copies):  # (uint32 offsets: copies * values must stay under 2**32)
            f.write((rows[1:].astype(np.int64) + k * n_values).astype(dtypes["ROWPTR"]))
    for name in ("data.npy", "col_ptr.npy"):
        chunk = (store / name).read_bytes()
        with open(tiled / name, "wb") as f:
            for _ in range(copies):
                f.write(chunk)
    _scdl_finish(store, tiled, header, copies * n_cells, copies * n_values)
    obs = pq.read_table(store / "obs_features" / "dataframe_0.parquet")
    pq.write_table(pa.concat_tables([obs] * copies), tiled / "obs_features" / "dataframe_0.parquet")
    return tiled


SCDL_PATHS = ("scdl", "scdl-library")  # measure's paths on an SCDL store: open_scdl, the package
SCDL_CHUNK_CELLS = 1 << 20  # cells generated (and obs rows written) at a time
SCDL_MAX_GAP = 50  # a cell's genes are columns base + cumsum(gaps), gaps in [1, this): distinct


def scdl_generate(src: Path, out: Path, n_cells: int, genes: int, seed: int = 0) -> Path:
    """A Geneformer data folder whose SCDL store (out/train) has n_cells synthetic cells of `genes`
    distinct genes each (columns of src's var table that are in its vocabulary; counts 1..19), in
    src's dtypes, plus an obs table with one column, the cell id ("cell_0000000042")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store, header, dtypes = _scdl_copy(src, out)
    new, n_values = out / "train", n_cells * genes
    if n_values >= np.iinfo(dtypes["ROWPTR"]).max:
        raise SystemExit(f"{n_cells} x {genes} values overflow {store}'s {dtypes['ROWPTR']} rows")
    var = pq.read_table(store / "var_features" / "dataframe_0.parquet", columns=["feature_id"])
    vocab = set(json.loads((src / "vocab.json").read_text()))  # {token: id} or [token, ...]
    known = np.array([i for i, g in enumerate(var.column(0).to_pylist()) if g in vocab])
    span = genes * SCDL_MAX_GAP
    if len(known) <= span:
        raise SystemExit(f"{store}: only {len(known)} var genes are in the vocabulary")
    rng = np.random.default_rng(seed)
    obs_schema = pa.schema([("obs_feature_id", pa.string())])
    (new / "obs_features").mkdir()
    with (
        open(new / "data.npy", "wb") as data,
        open(new / "col_ptr.npy", "wb") as cols,
        open(new / "row_ptr.npy", "wb") as rows,
        pq.ParquetWriter(new / "obs_features" / "dataframe_0.parquet", obs_schema) as obs,
    ):
        rows.write(np.zeros(1, dtypes["ROWPTR"]))
        for first in range(0, n_cells, SCDL_CHUNK_CELLS):
            n = min(SCDL_CHUNK_CELLS, n_cells - first)
            base = rng.integers(0, len(known) - span, (n, 1))
            picked = base + np.cumsum(rng.integers(1, SCDL_MAX_GAP, (n, genes)), axis=1)
            cols.write(known[picked].astype(dtypes["COLPTR"]).tobytes())
            data.write(rng.integers(1, 20, (n, genes)).astype(dtypes["DATA"]).tobytes())
            ends = (first + 1 + np.arange(n, dtype=np.int64)) * genes
            rows.write(ends.astype(dtypes["ROWPTR"]).tobytes())
            obs.write_table(pa.table([fixed_ids("cell_", first, n)], schema=obs_schema))
    _scdl_finish(store, new, header, n_cells, n_values)
    return new


def library_cells():
    """ScdlCells opened with bionemo-scdl's own load (obs read into every process): the code path
    before open_scdl, kept here for the before/after figures and the equality test."""
    from bionemo.data.cells import ScdlCells
    from bionemo.data.cells_scdl import scdl

    class LibraryScdlCells(ScdlCells):
        def store(self):
            if self._pid != os.getpid():
                self._ds, self._pid, self._lookups = scdl()(str(self.path)), os.getpid(), {}
            return self._ds

    return LibraryScdlCells


# ---------------------------------------------------------------------------------- memory
def memory(pid="self") -> dict[str, int]:
    """Rss, Pss, Uss (private pages) and the anonymous part, in bytes, of one process."""
    fields: dict[str, int] = {}
    for name in (f"/proc/{pid}/smaps_rollup", f"/proc/{pid}/smaps"):
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB" and parts[0].endswith(":"):
                key = parts[0][:-1]
                fields[key] = fields.get(key, 0) + int(parts[1]) * 1024
        if "Pss" in fields:
            break
    if "Rss" not in fields:  # no smaps here: VmRSS only
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                fields["Rss"] = int(line.split()[1]) * 1024
    return {
        "rss": fields.get("Rss", 0),
        "pss": fields.get("Pss", -1),
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        if "Private_Clean" in fields
        else -1,
        "anon": fields.get("Anonymous", -1),
    }


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return -1


# ------------------------------------------------------------------------------------ one rank
def _wait_for(sync: Path, stage: str, ranks: int, timeout: float = 900) -> None:
    end, parent = time.monotonic() + timeout, os.getppid()
    while len(list(sync.glob(f"{stage}-*"))) < ranks:
        if (sync / "abort").exists() or time.monotonic() > end or os.getppid() != parent:
            raise SystemExit(f"{stage}: the other ranks did not arrive")
        time.sleep(0.05)


def _touch(arrays) -> None:
    """Read one element per page of each array: every page of the index becomes resident."""
    for a in arrays:
        if len(a):
            int(a[:: max(1, 4096 // a.itemsize)].sum(dtype=np.int64))


def rank_main(args) -> None:
    t_spawn = args.spawned_at
    with open("/proc/self/oom_score_adj", "w") as f:  # under memory pressure, die before the parent
        f.write("1000")
    import resource

    from bionemo.config import DataConfig
    from bionemo.data.dataset import GlobalBatchSampler, MLMDataset

    sync, rank, ranks = Path(args.sync), args.rank, args.ranks
    if args.path in SCDL_PATHS:  # the package's imports (anndata, pandas) are not the dataset's
        from bionemo.config import CellDataConfig
        from bionemo.data.cells import CellMLMDataset, open_cells
        from bionemo.data.cells_scdl import scdl
        from bionemo.data.cells_tokenizer import GeneVocab, load_gene_medians

        scdl()
    rec = {"rank": rank, "imports_s": time.time() - t_spawn, "mem_imports": memory()}
    t0 = time.monotonic()
    if args.path in SCDL_PATHS:  # Geneformer: the SCDL store in --data/train
        data = Path(args.data)
        cfg = CellDataConfig(
            train=data / "train",
            valid=None,
            vocab=data / "vocab.json",
            gene_medians=data / "gene_medians.json",
        )
        vocab = GeneVocab.load(cfg.vocab)
        if args.path == "scdl":
            cells = open_cells(cfg, SEQ_LENGTH, "train", vocab)
        else:  # before: bionemo-scdl's own load
            medians = load_gene_medians(cfg.gene_medians, vocab)
            cells = library_cells()(
                cfg.train, vocab, medians, SEQ_LENGTH, cfg.normalize_total, "data.train"
            )
        rec["clusters_s"] = time.monotonic() - t0
        dataset = CellMLMDataset(cells, vocab, cfg, seed=1234)
        store = cells.store()
        index = (store.data, store.col_index, store.row_index)
    else:
        clusters = synthetic_clusters()(
            Path(args.data) / TRAIN_FILE, Path(args.data), COLUMN, memory_map=args.path == "mmap"
        )
        rec["clusters_s"] = time.monotonic() - t0
        dataset = MLMDataset(clusters, SEQ_LENGTH, DataConfig(), seed=1234)
        index = (clusters.offsets, clusters.id_offsets, clusters.id_bytes)
    batches = iter(GlobalBatchSampler(0, MICRO_BATCH, rank, ranks, 1))
    first = next(batches)
    dataset[first[0]]  # the first sample draws the epoch's permutation
    rec["startup_s"] = time.monotonic() - t0
    t1, n = time.monotonic(), 0
    while n < args.samples:
        for g in next(batches):
            dataset[g]
            n += 1
    rec["samples"], rec["sample_ms"] = n, 1000 * (time.monotonic() - t1) / max(n, 1)
    rec["mem_started_alone"] = memory()
    (sync / f"started-{rank}").touch()
    _wait_for(sync, "started", ranks)
    rec["mem_started"] = memory()  # every rank alive and started: PSS splits shared pages
    (sync / f"measured-{rank}").touch()
    _wait_for(sync, "measured", ranks)
    if args.path in ("mmap", *SCDL_PATHS):
        _touch(index)
        (sync / f"touched-{rank}").touch()
        _wait_for(sync, "touched", ranks)
        rec["mem_touched"] = memory()
        (sync / f"measured2-{rank}").touch()
        _wait_for(sync, "measured2", ranks)
    rec["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(rec), flush=True)


# ------------------------------------------------------------------------------------- measure
def run_ranks(data: Path, path: str, ranks: int, samples: int, cold: bool) -> dict:
    index = data / f"{TRAIN_FILE}.{COLUMN}.index"
    if cold:
        shutil.rmtree(index, ignore_errors=True)
    sync = data / f".sync-{path}-{ranks}-{os.getpid()}"
    shutil.rmtree(sync, ignore_errors=True)
    sync.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start, avail0 = time.monotonic(), mem_available()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.data_scale",
                "_rank",
                "--data",
                str(data),
                "--path",
                path,
                "--rank",
                str(r),
                "--ranks",
                str(ranks),
                "--samples",
                str(samples),
                "--sync",
                str(sync),
                "--spawned-at",
                repr(time.time()),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(ranks)
    ]
    peak = {"pss_sum": 0, "rss_sum": 0, "mem_available_min": avail0}
    stop, aborted, low = threading.Event(), [], [0]

    def monitor():
        while not stop.wait(0.25):
            live = [memory(p.pid) for p in procs if p.poll() is None]
            peak["pss_sum"] = max(peak["pss_sum"], sum(max(m["pss"], 0) for m in live))
            peak["rss_sum"] = max(peak["rss_sum"], sum(m["rss"] for m in live))
            avail = mem_available()
            peak["mem_available_min"] = min(peak["mem_available_min"], avail)
            low[0] = low[0] + 1 if 0 <= avail < LOW_MEMORY_BYTES else 0
            if low[0] >= LOW_MEMORY_SAMPLES and not aborted:
                aborted.append(f"MemAvailable fell to {avail / GiB:.1f} GiB: stopped the ranks")
                (sync / "abort").touch()
                for p in procs:
                    p.kill()

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    outs = [p.communicate() for p in procs]
    stop.set()
    watcher.join()
    shutil.rmtree(sync, ignore_errors=True)
    result = {
        "path": path,
        "ranks": ranks,
        "cold": cold,
        "wall_s": time.monotonic() - start,
        "mem_available_before": avail0,
        "node_peak": peak,
        "per_rank": [],
    }
    for p, (out, err) in zip(procs, outs):
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if p.returncode == 0 and lines:
            result["per_rank"].append(json.loads(lines[-1]))
        else:
            result.setdefault("failed", []).append(
                {"returncode": p.returncode, "stderr_tail": err[-1500:]}
            )
    if aborted:
        result["aborted"] = aborted[0]
    return result


def summarize(run: dict) -> dict:
    """Max over ranks of the per-rank figures, sums over ranks of the node figures, in GiB/s."""
    ranks = run["per_rank"]
    if not ranks:
        return {}

    def top(f):
        return max(f(r) for r in ranks)

    out = {
        "startup_s_max": top(lambda r: r["startup_s"]),
        "clusters_s_max": top(lambda r: r["clusters_s"]),
        "imports_s_max": top(lambda r: r["imports_s"]),
        "sample_ms_mean": sum(r["sample_ms"] for r in ranks) / len(ranks),
        "peak_rss_gib_max": top(lambda r: r["peak_rss"]) / GiB,
        # private memory the dataset added to a rank (anonymous pages over the imports' own)
        "dataset_anon_gib_max": top(lambda r: r["mem_started"]["anon"] - r["mem_imports"]["anon"])
        / GiB,
    }
    for stage in ("mem_started", "mem_touched"):
        if stage in ranks[0]:
            for k in ("rss", "pss", "uss"):
                out[f"{stage}_{k}_gib_max"] = top(lambda r: r[stage][k]) / GiB
                out[f"{stage}_{k}_gib_sum"] = sum(r[stage][k] for r in ranks) / GiB
            # what the dataset added to a rank, over the interpreter + torch baseline
            out[f"{stage}_pss_minus_imports_gib_sum"] = (
                sum(r[stage]["pss"] - r["mem_imports"]["pss"] for r in ranks) / GiB
            )
    out["node_peak_pss_sum_gib"] = run["node_peak"]["pss_sum"] / GiB
    out["node_mem_available_drop_gib"] = (
        run["mem_available_before"] - run["node_peak"]["mem_available_min"]
    ) / GiB
    return out


def machine() -> dict:
    import pyarrow

    meminfo = Path("/proc/meminfo").read_text().splitlines()[0]
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "meminfo_total": meminfo,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
    }


def measure(args) -> dict:
    import pyarrow.parquet as pq

    data = Path(args.data)
    if (data / "train" / "metadata.json").is_file():  # an SCDL folder (scdl runs)
        store = data / "train"
        info = {
            "cells": json.loads((store / "metadata.json").read_text())["num_rows"],
            "store_bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()),
        }
    else:
        meta = pq.ParquetFile(data / TRAIN_FILE).metadata
        info = {"clusters": meta.num_rows, "parquet_bytes": (data / TRAIN_FILE).stat().st_size}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.data_scale", *sys.argv[1:]]),
        "commit": args.commit or project_commit() or "unknown",
        "machine": machine(),
        "data": info,
        "runs": [],
    }
    start = time.monotonic()
    for spec in args.runs.split(","):
        path, ranks = spec.split(":")
        ranks, cold = int(ranks), path.endswith("-cold")
        path = path.removesuffix("-cold")
        entry = {"path": path, "ranks": ranks, "cold": cold}
        alone = next(
            (
                r
                for r in report["runs"]
                if r["path"] == path and r["ranks"] == 1 and r.get("summary")
            ),
            None,
        )
        need = alone and alone["summary"]["peak_rss_gib_max"] * ranks
        left = args.deadline_s - (time.monotonic() - start)
        in_memory = path in ("parquet", "scdl-library")  # a private copy per rank
        if in_memory and need and need > 0.9 * args.mem_limit_gib:
            entry["skipped"] = (
                f"predicted not to fit: {ranks} x {need / ranks:.1f} GiB peak "
                f"RSS (1-rank run) = {need:.0f} GiB > 90% of "
                f"{args.mem_limit_gib} GiB"
            )
        elif left < (2 * alone["wall_s"] + 10 if alone else 30):
            entry["skipped"] = f"out of time: {left:.0f} s of --deadline-s left"
        else:
            entry = run_ranks(data, path, ranks, args.samples, cold)
            entry["summary"] = summarize(entry)
        report["runs"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "per_rank"}), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    index = data / f"{TRAIN_FILE}.{COLUMN}.index"
    if (index / "meta.json").is_file():
        report["data"]["index"] = json.loads((index / "meta.json").read_text())["counts"]
        report["data"]["index_bytes"] = sum(f.stat().st_size for f in index.iterdir())
        report["data"]["ids"] = report["data"]["index"]["id_offsets"] - 1
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


def table(report: dict) -> str:
    rows = [
        "| path | ranks | index | start-up s (max rank) | of which clusters s "
        "| peak RSS/rank GiB | RSS/rank GiB | PSS/rank GiB | USS/rank GiB | sum PSS GiB "
        "| dataset's private GiB/rank | after touching all: RSS/rank, sum PSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        name = {
            "mmap": "memory-mapped",
            "parquet": "parquet in memory",
            "scdl": "SCDL store, open_scdl",
            "scdl-library": "SCDL store, bionemo-scdl load",
        }[run["path"]]
        idx = {"parquet": "-", "scdl": "(memmaps)", "scdl-library": "(memmaps)"}.get(
            run["path"]
        ) or ("built by this run" if run["cold"] else "present")
        s = run.get("summary")
        if not s:
            why = run.get("skipped") or run.get("aborted") or f"failed: {run.get('failed')}"
            rows.append(f"| {name} | {run['ranks']} | {idx} | {why} ||||||||||")
            continue
        touched = "-"
        if "mem_touched_rss_gib_max" in s:
            touched = f"{s['mem_touched_rss_gib_max']:.2f}, {s['mem_touched_pss_gib_sum']:.2f}"
        rows.append(
            f"| {name} | {run['ranks']} | {idx} | {s['startup_s_max']:.1f} | "
            f"{s['clusters_s_max']:.1f} | {s['peak_rss_gib_max']:.2f} | "
            f"{s['mem_started_rss_gib_max']:.2f} | {s['mem_started_pss_gib_max']:.2f} | "
            f"{s['mem_started_uss_gib_max']:.2f} | {s['mem_started_pss_gib_sum']:.2f} | "
            f"{s['dataset_anon_gib_max']:.2f} | {touched} |"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write a synthetic clusters parquet")
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--clusters", type=int, default=60_000_000)
    g.add_argument("--ids", type=int, default=200_000_000)
    g.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure", help="start-up and memory per rank")
    m.add_argument("--data", required=True, type=Path)
    m.add_argument(
        "--runs",
        default="parquet:1,parquet:8,mmap-cold:8,mmap:1,mmap:8",
        help="comma-separated PATH:RANKS, PATH parquet, mmap, mmap-cold, or scdl or "
        "scdl-library (--data: a folder made by scdl-tile or scdl-generate)",
    )
    m.add_argument("--samples", type=int, default=256, help="samples each rank reads")
    m.add_argument("--json", type=Path)
    m.add_argument(
        "--mem-limit-gib",
        type=float,
        default=128,
        help="skip a parquet run whose ranks' predicted peak exceeds 90%% of this",
    )
    m.add_argument("--deadline-s", type=float, default=1e9, help="skip runs that would overrun")
    m.add_argument("--commit", help="the project's commit (default: git rev-parse HEAD)")
    t = sub.add_parser("scdl-tile", help="a larger SCDL store: a small one's cells, repeated")
    t.add_argument("--src", type=Path, default=Path("data/geneformer_sample"))
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--copies", type=int, default=100)
    c = sub.add_parser("scdl-generate", help="an SCDL store of synthetic cells, few genes each")
    c.add_argument("--src", type=Path, default=Path("data/geneformer_sample"))
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--cells", type=int, default=20_000_000)
    c.add_argument("--genes-per-cell", type=int, default=8)
    c.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("_rank")  # one rank of a measure run
    for name in ("--data", "--path", "--sync"):
        r.add_argument(name, required=True)
    for name in ("--rank", "--ranks", "--samples"):
        r.add_argument(name, type=int, required=True)
    r.add_argument("--spawned-at", type=float, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "generate":
        t0 = time.monotonic()
        path = generate(args.out, args.clusters, args.ids, args.seed)
        print(
            f"{args.clusters} clusters, {args.ids} ids -> {path} "
            f"({path.stat().st_size / GiB:.2f} GiB, {time.monotonic() - t0:.0f} s)"
        )
    elif args.cmd == "measure":
        measure(args)
    elif args.cmd == "scdl-tile":
        print(scdl_tile(args.src, args.out, args.copies))
    elif args.cmd == "scdl-generate":
        t0 = time.monotonic()
        store = scdl_generate(args.src, args.out, args.cells, args.genes_per_cell, args.seed)
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        took = time.monotonic() - t0
        print(f"{args.cells} cells -> {store} ({size / GiB:.2f} GiB, {took:.0f} s)")
    else:
        rank_main(args)


if __name__ == "__main__":
    main()
