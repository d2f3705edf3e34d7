"""ESM-2 pretraining data in BioNeMo's UniRef layout, addressed by global sample index.

Files (see bionemo.data.prep to build them):
  train clusters parquet  column ur90_id: list of UniRef90 member ids, one row per UniRef50 cluster
  valid clusters parquet  column ur50_id: one id per row
  SQLite database         protein(id TEXT PRIMARY KEY, sequence TEXT)
A clusters column is read through a memory-mapped index built beside its parquet on first use
(ClusterIndex), so the ranks of a node share one copy of the ids.

An item is a pure function of (seed, g), where g = 0, 1, 2, ... is the global sample index:
  epoch = g // N, p = g % N (N clusters); cluster = permutation(seed, epoch)[p];
  member, crop window and masking all come from one rng seeded with (seed, epoch, cluster).
No state lives in the dataset, so worker count, world size and restarts cannot change the
stream; the sampler decides which g each rank reads (GlobalBatchSampler).
"""

from __future__ import annotations

import functools
import os
import sqlite3
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bionemo.config import DataConfig
from bionemo.config_data import id_column_problem
from bionemo.data.cluster_index import ClusterIndex, _flatten
from bionemo.data.masking import IGNORE_INDEX, mask_tokens
from bionemo.data.tokenizer import CLS_ID, EOS_ID, PAD_ID, encode

# First word of the rng seeds, so the permutation stream and the per-item streams never coincide
# (numpy's SeedSequence treats [a, b] and [a, b, 0] alike, so distinct lengths are not enough).
_PERMUTATION_STREAM = 0
_ITEM_STREAM = 1


class EpochOrder:
    """The determinism rule every dataset here follows: a global sample index g names an
    (epoch, item) pair, and everything random about that sample is drawn from a generator seeded
    by (seed, epoch, item). With shuffle, epoch g // n visits the n items in a permutation seeded
    by (seed, epoch); without (validation), the epoch is 0 and the item is g % n.
    """

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, None  # the current epoch's permutation (samples share one)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([_PERMUTATION_STREAM, self.seed, epoch])
            perm = rng.permutation(self.n)
            # int32 where it fits: the same values in half the memory (UniRef50's ~60M clusters:
            # 240 MB a rank instead of 480 MB).
            self._perm, self._epoch = perm.astype(np.int32) if self.n < 2**31 else perm, epoch
        return self._perm

    def locate(self, g: int) -> tuple[int, int]:
        if not self.shuffle:
            return 0, int(g) % self.n
        epoch, p = divmod(int(g), self.n)
        return epoch, int(self.order(epoch)[p])

    def rng(self, epoch: int, item: int) -> np.random.Generator:
        return np.random.default_rng([_ITEM_STREAM, self.seed, epoch, item])


_MAKE_DATA = "run `make data` for the sample set, or build yours with `python -m bionemo.data.prep`"


class ProteinClusters:
    """Clusters of protein ids (a parquet column) plus the id -> sequence table (SQLite).

    `column` may hold a list of ids per row (ur90_id: one cluster of members per row) or one id per
    row (ur50_id: single-member clusters). `key` is the config key of the clusters file, named in
    error messages. memory_map=True (the default) reads the column through a ClusterIndex shared
    by all processes of a node; False reads it into this process's memory, as every rank did
    before (same ids, same samples). The SQLite connection opens on first use, once per process,
    so a dataset built before DataLoader workers fork (or pickled to them) gets its own connection
    in each worker.
    """

    def __init__(
        self,
        clusters_path,
        database_path,
        column: str = "ur90_id",
        *,
        key: str = "data.train_clusters",
        memory_map: bool = True,
    ):
        self.clusters_path, self.database_path = Path(clusters_path), Path(database_path)
        self.column, self.key = column, key
        self._check_schema()
        # The members of cluster i are ids k in [offsets[i], offsets[i + 1]); id k is the text
        # id_bytes[id_offsets[k] : id_offsets[k + 1]].
        self.index = ClusterIndex(self.clusters_path, column, key) if memory_map else None
        self.offsets, self.id_offsets, self.id_bytes = (
            self.index.open() if self.index else self._read_clusters()
        )
        self._check_database()
        self._conn: sqlite3.Connection | None = None
        self._conn_pid: int | None = None

    def _check_schema(self) -> None:
        path, key = self.clusters_path, self.key
        if not path.is_file():
            raise FileNotFoundError(
                f"{key}: {path} does not exist; {_MAKE_DATA}, or point {key} at your file"
            )
        problem = id_column_problem(path, self.column)
        if problem:
            raise ValueError(f"{key}: {problem}; rebuild it ({_MAKE_DATA}) or point {key} at yours")

    def _read_clusters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            col = pq.read_table(self.clusters_path, columns=[self.column]).column(self.column)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(
                f"{self.key}: could not read column {self.column!r} of {self.clusters_path} "
                f"({e}); rebuild it"
            ) from e
        # Large (64-bit offset) types: UniRef90 has ~200M ids, more than 2 GiB of id text.
        return _flatten(col, self.key, self.clusters_path, self.column)

    def _check_database(self) -> None:
        path = self.database_path
        if not path.is_file():
            raise FileNotFoundError(
                f"data.database: {path} does not exist; {_MAKE_DATA}, "
                f"or point data.database at your file"
            )
        conn = self._connect()
        try:
            conn.execute("SELECT id, sequence FROM protein LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:  # not a database, or no protein(id, sequence) table
            raise ValueError(
                f"data.database: {path} is not a SQLite file with a table "
                f"protein(id TEXT PRIMARY KEY, sequence TEXT) ({e}); rebuild it: {_MAKE_DATA}"
            ) from e
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        # Read-only: many workers on many nodes share the file.
        return sqlite3.connect(f"file:{self.database_path.resolve()}?mode=ro", uri=True)

    def __getstate__(self):  # a connection cannot be pickled (spawn-started workers); reopen there
        state = {**self.__dict__, "_conn": None, "_conn_pid": None}
        if self.index:  # pickling a memmap copies its data: map the index again instead
            state.update(offsets=None, id_offsets=None, id_bytes=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.index:
            self.offsets, self.id_offsets, self.id_bytes = ClusterIndex.map(self.index.path)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def num_members(self, cluster: int) -> int:
        return int(self.offsets[cluster + 1] - self.offsets[cluster])

    def member(self, cluster: int, j: int) -> str:
        k = int(self.offsets[cluster]) + j
        return self.id_bytes[self.id_offsets[k] : self.id_offsets[k + 1]].tobytes().decode()

    def __getitem__(self, cluster: int) -> list[str]:
        return [self.member(cluster, j) for j in range(self.num_members(cluster))]

    def sequence(self, protein_id: str) -> str:
        if self._conn_pid != os.getpid():  # first use in this process (main, or a fresh worker)
            self._conn, self._conn_pid = self._connect(), os.getpid()
        row = self._conn.execute(
            "SELECT sequence FROM protein WHERE id = ?", (protein_id,)
        ).fetchone()
        if row is None:
            raise KeyError(
                f"data.database: no protein {protein_id!r} in {self.database_path} "
                f"(listed in {self.key})"
            )
        return row[0]


class MLMDataset(Dataset):
    """Masked-LM samples indexed by global sample index g (any g >= 0; len() is one epoch).

    shuffle=True (training): epoch g // N visits the clusters in a per-epoch permutation and picks
    a member per (epoch, cluster). shuffle=False (validation): epoch fixed at 0, cluster g % N, so
    every evaluation sees the same sequences, crops and masks.

    Cropping: a sequence longer than seq_length - 2 residues is cut to a random window of
    seq_length - 2 residues. <cls> and <eos> always wrap the window (BioNeMo's rule), so every
    item starts with <cls>, ends with <eos> and has at most seq_length tokens; for a cropped
    sequence the <eos> marks the end of the window, not of the protein.
    """

    def __init__(
        self,
        clusters: ProteinClusters,
        seq_length: int,
        data_cfg: DataConfig,
        seed: int,
        shuffle: bool = True,
    ):
        if seq_length < 3:
            raise ValueError(
                f"seq_length must be >= 3 (<cls>, one residue, <eos>), got {seq_length}"
            )
        if len(clusters) == 0:
            raise ValueError(f"{clusters.key}: {clusters.clusters_path} has no clusters")
        self.clusters, self.seq_length = clusters, seq_length
        self.epochs = EpochOrder(len(clusters), seed, shuffle)
        self.mask_kwargs = dict(
            mask_prob=data_cfg.mask_prob,
            mask_token_prob=data_cfg.mask_token_prob,
            random_token_prob=data_cfg.random_token_prob,
            random_token_pool=data_cfg.random_token_pool,
        )

    def __len__(self) -> int:
        return len(self.clusters)

    def order(self, epoch: int) -> np.ndarray:
        """The cluster order of an epoch."""
        return self.epochs.order(epoch)

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        epoch, cluster = self.epochs.locate(g)
        rng = self.epochs.rng(epoch, cluster)

        member = self.clusters.member(
            cluster, int(rng.integers(self.clusters.num_members(cluster)))
        )
        residues = encode(self.clusters.sequence(member))
        window = self.seq_length - 2  # room left by <cls> and <eos>
        if len(residues) > window:
            start = int(rng.integers(len(residues) - window + 1))  # +1: the last window is allowed
            residues = residues[start : start + window]
        tokens = np.concatenate(([CLS_ID], residues, [EOS_ID]))
        input_ids, labels = mask_tokens(tokens, rng, **self.mask_kwargs)
        return {"input_ids": input_ids, "labels": labels}


class GlobalBatchSampler(Sampler):
    """Infinite stream of this rank's micro-batches of global sample indices.

    A global step covers G = micro_batch_size * dp_size * grad_accumulation consecutive samples;
    micro-step k of the step on rank r reads step_start + k*micro*dp + r*micro + [0, micro).
    Steps start at start_sample, the consumed-samples count saved in checkpoints. Because the
    resume position is a global sample count, not a per-rank batch count, resuming at another
    world size (or accumulation) continues the same sample stream: only its split over ranks
    changes. start_sample need not be a multiple of the new G.
    """

    def __init__(
        self,
        start_sample: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        grad_accumulation: int,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if start_sample < 0 or micro_batch_size < 1 or grad_accumulation < 1:
            raise ValueError(
                "need start_sample >= 0, micro_batch_size >= 1, grad_accumulation >= 1"
            )
        self.start_sample, self.micro, self.rank = start_sample, micro_batch_size, dp_rank
        self.dp, self.accum = dp_size, grad_accumulation

    @property
    def global_batch_size(self) -> int:
        return self.micro * self.dp * self.accum

    def __iter__(self):
        step_start = self.start_sample
        while True:
            for k in range(self.accum):
                first = step_start + k * self.micro * self.dp + self.rank * self.micro
                yield list(range(first, first + self.micro))
            step_start += self.global_batch_size


def collate(
    batch: list[dict],
    pad_to: Literal["longest", "max_length", "none"] = "longest",
    seq_length: int = 1024,
) -> dict[str, torch.Tensor]:
    """Pad a list of samples into input_ids / labels (int64) and attention_mask (bool, True = real).

    "longest" pads to the batch's longest sample rounded up to a multiple of 8 (tensor-core
    friendly shapes; never beyond seq_length); "max_length" always pads to seq_length (one shape
    for the whole run, e.g. for torch.compile without dynamic shapes); "none" packs (see `pack`).
    """
    longest = max(len(s["input_ids"]) for s in batch)
    if longest > seq_length:
        raise ValueError(f"a sample has {longest} tokens, more than seq_length {seq_length}")
    if pad_to == "none":
        return pack(batch)
    if pad_to == "longest":
        length = min(-(-longest // 8) * 8, seq_length)
    elif pad_to == "max_length":
        length = seq_length
    else:
        raise ValueError(f"pad_to must be 'longest', 'max_length' or 'none', got {pad_to!r}")

    input_ids = np.full((len(batch), length), PAD_ID, dtype=np.int64)
    labels = np.full((len(batch), length), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(batch), length), dtype=bool)
    for i, s in enumerate(batch):
        n = len(s["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = s["input_ids"], s["labels"], True
    # The mask comes from the lengths, not from input_ids != PAD_ID: with the all_tokens pool a
    # masked position can be replaced by a random <pad>, which is still a real position.
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(attention_mask),
    }


PACK_MULTIPLE = 128  # packed rows are padded to a multiple of this: few distinct shapes to compile


def pack(batch: list[dict]) -> dict:
    """Concatenate the samples into one row [1, T] with no padding between them.

    `cu_seqlens` (int32, [N+2]) holds the sequence boundaries for variable-length attention; the
    tail up to a multiple of PACK_MULTIPLE is one more "sequence" of <pad> (attending only to
    itself, labels ignored), so every position belongs to a segment. `max_seqlen` is a Python int
    (flash attention needs it on the host; computing it here avoids a device sync).
    """
    lengths = [len(s["input_ids"]) for s in batch]
    real = sum(lengths)
    total = -(-real // PACK_MULTIPLE) * PACK_MULTIPLE
    input_ids = np.full((1, total), PAD_ID, dtype=np.int64)
    labels = np.full((1, total), IGNORE_INDEX, dtype=np.int64)
    input_ids[0, :real] = np.concatenate([s["input_ids"] for s in batch])
    labels[0, :real] = np.concatenate([s["labels"] for s in batch])
    attention_mask = np.zeros((1, total), dtype=bool)
    attention_mask[0, :real] = True
    bounds = np.concatenate([[0], np.cumsum(lengths), [total] if total > real else []])
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(attention_mask),
        "cu_seqlens": torch.from_numpy(bounds.astype(np.int32)),
        "max_seqlen": int(max(np.diff(bounds))),
    }


def build_dataloader(
    data_cfg: DataConfig,
    seq_length: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    grad_accumulation: int,
    start_sample: int,
    split: Literal["train", "valid"] = "train",
    pad_to: Literal["longest", "max_length", "none"] = "longest",
) -> DataLoader:
    """This rank's infinite loader of micro-batches, starting at global sample start_sample.

    For validation pass start_sample=0 so every evaluation reads the same samples.
    """
    if split == "train":
        clusters = ProteinClusters(
            data_cfg.train_clusters, data_cfg.database, "ur90_id", key="data.train_clusters"
        )
    elif split == "valid":
        if data_cfg.valid_clusters is None:
            raise ValueError(
                "data.valid_clusters is not set; point it at a validation parquet (column ur50_id)"
            )
        clusters = ProteinClusters(
            data_cfg.valid_clusters, data_cfg.database, "ur50_id", key="data.valid_clusters"
        )
    else:
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    dataset = MLMDataset(
        clusters, seq_length, data_cfg, seed=data_cfg.seed, shuffle=split == "train"
    )
    sampler = GlobalBatchSampler(
        start_sample, micro_batch_size, dp_rank, dp_size, grad_accumulation
    )
    return rank_loader(
        dataset,
        sampler,
        functools.partial(collate, pad_to=pad_to, seq_length=seq_length),
        data_cfg.num_workers,
    )


def rank_loader(
    dataset: Dataset, sampler: GlobalBatchSampler, collate_fn, num_workers: int
) -> DataLoader:
    """The DataLoader of every data pipeline here (proteins, cells)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Its own generator: each iter() draws its workers' base seed from it; without one that
        # draw comes from torch's global RNG, which dropout uses, so an iterator created at resume
        # (or for validation) would shift every later dropout mask and break bit-exact resume.
        # Items take their randomness from per-item numpy generators, so the seed is unused.
        generator=torch.Generator(),
    )
