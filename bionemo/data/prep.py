"""Build BioNeMo's UniRef layout from a FASTA file and an optional member -> cluster table.

    python -m bionemo.data.prep --fasta seqs.fasta [--clusters members.tsv] --out DIR \
        [--valid-fraction 0.01] [--seed 0]

Inputs:
  FASTA        records ">ID description", sequence on one or more lines; the ID is the first word
               after ">" and is kept as is (e.g. UniRef90_P12345). Residues are upper-cased.
  members.tsv  optional "member_id<TAB>cluster_id" lines (e.g. UniRef90 -> UniRef50). Without it
               every sequence is its own cluster; FASTA ids the table does not list become
               single-member clusters too.
Outputs in DIR:
  train_clusters.parquet  ur50_id (cluster id), ur90_id (list of member ids), one row per cluster
  valid_clusters.parquet  ur50_id: one representative protein id per held-out cluster (the
                          cluster id when it is itself a FASTA id, else the cluster's first member)
  proteins.sqlite         protein(id TEXT PRIMARY KEY, sequence TEXT): every FASTA sequence
The held-out clusters are a seeded random valid_fraction of all clusters (at least one when the
fraction is > 0), so train and validation never share a cluster. Files are written under
temporary names and renamed at the end: a failed run leaves no half-built set behind.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TRAIN_FILE, VALID_FILE, DATABASE_FILE = (
    "train_clusters.parquet",
    "valid_clusters.parquet",
    "proteins.sqlite",
)


def read_fasta(path):
    """Yield (id, sequence) per record; ValueError naming the file and line for malformed input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--fasta: {path} does not exist")
    protein_id, chunks, header_line = None, [], 0

    def record():
        if not chunks:
            raise ValueError(
                f"--fasta: {path} line {header_line}: record {protein_id!r} has no sequence"
            )
        return protein_id, "".join(chunks).upper()

    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                if protein_id is not None:
                    yield record()
                words = line[1:].split()
                if not words:
                    raise ValueError(f"--fasta: {path} line {lineno}: header has no id")
                protein_id, chunks, header_line = words[0], [], lineno
            elif protein_id is None:
                raise ValueError(
                    f"--fasta: {path} line {lineno}: sequence before the first '>' header; "
                    f"is this FASTA?"
                )
            elif not line.isalpha() or not line.isascii():
                raise ValueError(
                    f"--fasta: {path} line {lineno}: residues must be letters, got {line[:40]!r}"
                )
            else:
                chunks.append(line)
    if protein_id is None:
        raise ValueError(f"--fasta: {path} has no records")
    yield record()


def read_members(path, fasta_ids: set[str]) -> dict[str, list[str]]:
    """cluster id -> member ids, in the table's order; every member must be a FASTA id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--clusters: {path} does not exist")
    clusters: dict[str, list[str]] = {}
    seen: set[str] = set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2 or not all(fields):
                raise ValueError(
                    f"--clusters: {path} line {lineno}: expected member_id<TAB>cluster_id"
                )
            member, cluster = fields
            if member not in fasta_ids:
                raise ValueError(
                    f"--clusters: {path} line {lineno}: member {member!r} is not in the FASTA file"
                )
            if member in seen:
                raise ValueError(
                    f"--clusters: {path} line {lineno}: member {member!r} is listed twice"
                )
            seen.add(member)
            clusters.setdefault(cluster, []).append(member)
    return clusters


def prepare(fasta, out, clusters_tsv=None, valid_fraction: float = 0.01, seed: int = 0) -> dict:
    """Write the three files into `out`; return counts."""
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = {name: out / f".{name}.tmp" for name in (TRAIN_FILE, VALID_FILE, DATABASE_FILE)}
    tmp[DATABASE_FILE].unlink(missing_ok=True)

    # Stream the sequences into SQLite; keep only the ids in memory.
    ids: list[str] = []
    id_set: set[str] = set()
    db = sqlite3.connect(tmp[DATABASE_FILE])
    db.execute("PRAGMA journal_mode = OFF")  # a fresh scratch file: no rollback journal needed
    db.execute("PRAGMA synchronous = OFF")
    db.execute("CREATE TABLE protein (id TEXT PRIMARY KEY, sequence TEXT)")

    def records():
        for protein_id, seq in read_fasta(fasta):
            if protein_id in id_set:
                raise ValueError(f"--fasta: {fasta}: duplicate id {protein_id!r}")
            ids.append(protein_id)
            id_set.add(protein_id)
            yield protein_id, seq

    try:
        db.executemany("INSERT INTO protein VALUES (?, ?)", records())
        db.commit()
    finally:
        db.close()

    clusters = read_members(clusters_tsv, id_set) if clusters_tsv else {}
    listed = {m for members in clusters.values() for m in members}
    for protein_id in ids:  # sequences without a cluster are their own cluster
        if protein_id not in listed:
            clusters.setdefault(protein_id, []).append(protein_id)

    cluster_ids = list(clusters)
    n_valid = 0 if valid_fraction == 0 else max(1, round(valid_fraction * len(cluster_ids)))
    if n_valid >= len(cluster_ids):
        raise ValueError(
            f"{len(cluster_ids)} clusters are too few to hold out {n_valid} for validation"
        )
    held_out = set(np.random.default_rng(seed).permutation(len(cluster_ids))[:n_valid].tolist())
    train = [c for i, c in enumerate(cluster_ids) if i not in held_out]
    valid = [c for i, c in enumerate(cluster_ids) if i in held_out]

    pq.write_table(
        pa.table({"ur50_id": train, "ur90_id": [clusters[c] for c in train]}), tmp[TRAIN_FILE]
    )
    representatives = [c if c in id_set else clusters[c][0] for c in valid]
    pq.write_table(pa.table({"ur50_id": pa.array(representatives, pa.string())}), tmp[VALID_FILE])
    for name, path in tmp.items():
        os.replace(path, out / name)
    return {
        "sequences": len(ids),
        "clusters": len(cluster_ids),
        "train_clusters": len(train),
        "valid_clusters": len(valid),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fasta", required=True, type=Path)
    parser.add_argument(
        "--clusters",
        type=Path,
        help="member_id<TAB>cluster_id table (default: one cluster per sequence)",
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--valid-fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = prepare(args.fasta, args.out, args.clusters, args.valid_fraction, args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(
        f"{counts['sequences']} sequences in {counts['clusters']} clusters "
        f"({counts['train_clusters']} train, {counts['valid_clusters']} valid) -> {args.out}"
    )


if __name__ == "__main__":
    main()
