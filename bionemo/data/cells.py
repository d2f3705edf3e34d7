"""Geneformer pretraining data: cells -> rank-value encodings -> masked-LM micro-batches.

Two sources, chosen by data.format:
  scdl     an SCDL store (bionemo.data.cells_scdl) of raw counts; each cell is normalised, divided
           by the gene medians and ranked here (bionemo.data.cells_tokenizer), cut to seq_length
           tokens after <cls>.
  parquet  the recipe's pre-tokenized cells: column `input_ids`, one list of token ids per cell
           (already ranked; <cls> is prepended when the first token is not one), cut likewise.

Addressing is ESM-2's (bionemo.data.dataset): an item is a pure function of (seed, g), g the global
sample index -- epoch = g // N, cell = permutation(seed, epoch)[g % N], masking drawn from an rng
seeded with (seed, epoch, cell) -- and GlobalBatchSampler decides which g each rank reads, so the
data position is one integer and resume is exact at any world size or worker count.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from bionemo.config import CellDataConfig
from bionemo.data.cells_tokenizer import (
    GeneVocab,
    column_lookup,
    load_gene_medians,
    mask_genes,
    rank_value_encode,
)
from bionemo.data.dataset import EpochOrder, GlobalBatchSampler, collate, rank_loader

PARQUET_COLUMN = "input_ids"
_ROW_GROUP_CACHE = 4  # decoded parquet row groups kept per process (a few MB each)

_MAKE_DATA = "run `make data MODEL=geneformer_10m` for the sample set"


def check_vocab_size(vocab: GeneVocab, vocab_size: int | None) -> None:
    """The model's embedding must have exactly one row per token of the vocabulary file."""
    if vocab_size is not None and len(vocab) != vocab_size:
        raise ValueError(
            f"model.vocab_size is {vocab_size} but {vocab.key} has {len(vocab)} tokens; set "
            f"model.vocab_size={len(vocab)} (or point {vocab.key} at the vocabulary the model "
            f"was built for)"
        )


class ScdlCells:
    """Rank-value encodings of the cells of an SCDL store.

    The store opens on first use, once per process (memory maps do not survive pickling to
    spawn-started workers, and a forked worker is better off with maps of its own).
    """

    def __init__(
        self,
        path,
        vocab: GeneVocab,
        medians: dict[str, float],
        seq_length: int,
        normalize_total: float,
        key: str,
    ):
        self.path, self.key = Path(path), key
        self.vocab, self.medians = vocab, medians
        self.seq_length, self.normalize_total = seq_length, normalize_total
        if not (self.path / "metadata.json").is_file():
            raise FileNotFoundError(
                f"{key}: {self.path} is not an SCDL store (no metadata.json); {_MAKE_DATA}, or "
                f"convert your .h5ad files with bionemo-scdl's `convert_h5ad_to_scdl`"
            )
        self._ds, self._pid = None, None
        self._lookups: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._len = self.store().number_of_rows()
        if self._len and not (self._lookup(0)[0] >= 0).any():
            raise ValueError(
                f"{key}: none of the genes of {self.path} are in {vocab.key}; the store's var "
                f"feature ids must be the vocabulary's Ensembl ids"
            )

    def store(self):
        if self._pid != os.getpid():
            from bionemo.data.cells_scdl import open_scdl

            self._ds, self._pid, self._lookups = open_scdl(self.path), os.getpid(), {}
        return self._ds

    def __getstate__(self):
        return {**self.__dict__, "_ds": None, "_pid": None, "_lookups": {}}

    def __len__(self) -> int:
        return self._len

    def _lookup(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Token id and median of each column of the row's source file (cached per file)."""
        from bionemo.data.cells_scdl import feature_ids

        ids = feature_ids(self.store(), row, self.key)
        # The feature arrays live as long as the store, so their identity names the source file.
        if id(ids) not in self._lookups:
            self._lookups[id(ids)] = column_lookup(ids, self.vocab, self.medians)
        return self._lookups[id(ids)]

    def tokens(self, cell: int) -> np.ndarray:
        (values, columns), _, _ = self.store().get_row(cell)
        col_token, col_median = self._lookup(cell)
        return rank_value_encode(
            values,
            columns,
            col_token,
            col_median,
            cls_id=self.vocab.cls_id,
            seq_length=self.seq_length,
            normalize_total=self.normalize_total,
        )


class ParquetCells:
    """Pre-tokenized cells (column input_ids), read one row group at a time.

    Only the footer is read up front; a cell's row group is decoded on demand and the last few
    are cached, so memory stays small for corpora of millions of cells. Shuffled access decodes a
    row group per sample: write such files with small row groups (e.g. 1000 cells).
    """

    def __init__(self, path, vocab: GeneVocab, seq_length: int, key: str):
        self.path, self.key, self.vocab, self.seq_length = Path(path), key, vocab, seq_length
        if not self.path.is_file():
            raise FileNotFoundError(f"{key}: {self.path} does not exist; {_MAKE_DATA}")
        try:
            file = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{key}: {self.path} is not a readable parquet file ({e})") from e
        meta, names = file.metadata, file.schema_arrow.names
        if PARQUET_COLUMN not in names:
            raise ValueError(
                f"{key}: {self.path} has no column {PARQUET_COLUMN!r} (columns: {names}); the "
                f"recipe's format is one list of token ids per cell"
            )
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self._file, self._pid = None, None
        self._read_group = functools.lru_cache(_ROW_GROUP_CACHE)(self._decode_group)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_file", "_read_group")} | {
            "_file": None,
            "_pid": None,
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._read_group = functools.lru_cache(_ROW_GROUP_CACHE)(self._decode_group)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _decode_group(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self._pid != os.getpid():
            self._file, self._pid = pq.ParquetFile(self.path), os.getpid()
        col = self._file.read_row_group(i, columns=[PARQUET_COLUMN]).column(0)
        lists = col.combine_chunks()
        if not (pa.types.is_list(lists.type) or pa.types.is_large_list(lists.type)):
            raise ValueError(
                f"{self.key}: column {PARQUET_COLUMN!r} of {self.path} has type {lists.type}; "
                f"expected a list of integer token ids per cell"
            )
        offsets = lists.offsets.to_numpy()
        values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
        return offsets - offsets[0], values[offsets[0] : offsets[-1]]

    def tokens(self, cell: int) -> np.ndarray:
        group = int(np.searchsorted(self.starts, cell, side="right")) - 1
        offsets, values = self._read_group(group)
        j = cell - int(self.starts[group])
        ids = values[offsets[j] : offsets[j + 1]]
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.vocab)):
            raise ValueError(
                f"{self.key}: cell {cell} of {self.path} has token id {int(ids.max())} outside "
                f"{self.vocab.key} (size {len(self.vocab)}); the file and the vocabulary differ"
            )
        if not len(ids) or ids[0] != self.vocab.cls_id:
            ids = np.concatenate(([self.vocab.cls_id], ids))
        return ids[: self.seq_length]


class CellMLMDataset(Dataset):
    """Masked-LM samples indexed by global sample index g (any g >= 0; len() is one epoch).

    shuffle=True (training): epoch g // N visits the cells in a per-epoch permutation.
    shuffle=False (validation): cell g % N in epoch 0, so every evaluation sees the same masks.
    """

    def __init__(
        self, cells, vocab: GeneVocab, data_cfg: CellDataConfig, seed: int, shuffle: bool = True
    ):
        if len(cells) == 0:
            raise ValueError(f"{cells.key}: {cells.path} has no cells")
        if data_cfg.mask_token_prob + data_cfg.random_token_prob > 1:
            raise ValueError("data.mask_token_prob + data.random_token_prob must be <= 1")
        self.cells, self.vocab = cells, vocab
        self.epochs = EpochOrder(len(cells), seed, shuffle)
        self.mask_kwargs = dict(
            mask_prob=data_cfg.mask_prob,
            mask_token_prob=data_cfg.mask_token_prob,
            random_token_prob=data_cfg.random_token_prob,
        )

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        epoch, cell = self.epochs.locate(g)
        rng = self.epochs.rng(epoch, cell)
        input_ids, labels = mask_genes(self.cells.tokens(cell), rng, self.vocab, **self.mask_kwargs)
        return {"input_ids": input_ids, "labels": labels}


def collate_cells(
    batch: list[dict],
    pad_id: int,
    pad_to: Literal["longest", "max_length", "none"],
    seq_length: int,
) -> dict[str, torch.Tensor]:
    """ESM-2's collate (lengths -> attention_mask, padding rule), with Geneformer's <pad> id."""
    out = collate(batch, pad_to=pad_to, seq_length=seq_length)
    out["input_ids"].masked_fill_(~out["attention_mask"], pad_id)
    return out


def open_cells(
    data_cfg: CellDataConfig,
    seq_length: int,
    split: Literal["train", "valid"],
    vocab: GeneVocab | None = None,
):
    """The source of one split: ScdlCells or ParquetCells."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    path = data_cfg.train if split == "train" else data_cfg.valid
    if path is None:
        raise ValueError(f"data.valid is not set; point it at a validation {data_cfg.format} set")
    vocab = vocab or GeneVocab.load(data_cfg.vocab)
    key = f"data.{split}"
    if data_cfg.format == "parquet":
        return ParquetCells(path, vocab, seq_length, key)
    medians = load_gene_medians(data_cfg.gene_medians, vocab)
    return ScdlCells(path, vocab, medians, seq_length, data_cfg.normalize_total, key)


def build_dataloader(
    data_cfg: CellDataConfig,
    seq_length: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    grad_accumulation: int,
    start_sample: int,
    split: Literal["train", "valid"] = "train",
    pad_to: Literal["longest", "max_length", "none"] = "longest",
    *,
    vocab_size: int | None = None,
) -> DataLoader:
    """This rank's infinite loader of micro-batches, starting at global sample start_sample.

    Same arguments as bionemo.data.dataset.build_dataloader. vocab_size (model.vocab_size), when
    given, must equal the vocabulary file's size.
    """
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2 (<cls> and one gene), got {seq_length}")
    vocab = GeneVocab.load(data_cfg.vocab)
    check_vocab_size(vocab, vocab_size)
    cells = open_cells(data_cfg, seq_length, split, vocab)
    dataset = CellMLMDataset(cells, vocab, data_cfg, seed=data_cfg.seed, shuffle=split == "train")
    sampler = GlobalBatchSampler(
        start_sample, micro_batch_size, dp_rank, dp_size, grad_accumulation
    )
    return rank_loader(
        dataset,
        sampler,
        functools.partial(collate_cells, pad_id=vocab.pad_id, pad_to=pad_to, seq_length=seq_length),
        data_cfg.num_workers,
    )
