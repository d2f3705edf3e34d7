"""The trainer's data sections: input files, their cheap type checks, data and task configs.

Split out of bionemo.config (which re-exports every name here). Plain pydantic, no torch or
numpy, so the launcher can validate a job's data before anything is submitted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


PARQUET_MAGIC = b"PAR1"  # a parquet file starts and ends with it
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database
_KINDS = {
    "parquet": "a parquet file",
    "sqlite": "an SQLite database",
    "scdl": "an SCDL store (a folder with metadata.json)",
    "file": "a regular file",
}


def input_problem(path: str | Path, kind: str) -> str | None:
    """Why `path` cannot be a `kind` input (a key of _KINDS), or None. Cheap on purpose (the
    launcher runs it before every submit, each rank before training): the file type,
    readability, and at most 20 bytes of magic, so a folder, /dev/null or the database given as
    the parquet is refused before a job waits in the queue, not when it starts."""
    p = Path(path)
    if not p.exists():
        return f"{p} does not exist"
    if kind == "scdl":
        meta = p / "metadata.json"
        if not p.is_dir() or not meta.is_file():
            return f"{p} is not {_KINDS[kind]}"
        return None if os.access(meta, os.R_OK) else f"{meta} is not readable"
    if not p.is_file():
        return f"{p} is {'a folder' if p.is_dir() else 'not a regular file'}, not {_KINDS[kind]}"
    try:
        with open(p, "rb") as f:
            head, size = f.read(16), os.fstat(f.fileno()).st_size
            f.seek(max(0, size - 4))
            tail = f.read(4)
    except OSError as e:
        return f"{p} cannot be read ({e.strerror})"
    if kind == "parquet":
        ok = size >= 12 and head[:4] == tail == PARQUET_MAGIC
    else:
        ok = kind != "sqlite" or head == SQLITE_MAGIC
    if ok:
        return None
    if kind == "parquet" and head[:4] == PARQUET_MAGIC:
        return f"{p} is not a whole parquet file (no PAR1 footer: cut off while copying?)"
    seen = (
        "empty"
        if not size
        else _KINDS["sqlite"]
        if head == SQLITE_MAGIC
        else _KINDS["parquet"]
        if head[:4] == PARQUET_MAGIC
        else "something else"
    )
    return f"{p} is not {_KINDS[kind]} (its first bytes say: {seen})"


def id_column_problem(path: str | Path, column: str) -> str | None:
    """Why the parquet file's `column` cannot hold cluster member ids (one string id, or a list
    of them, per row), or None. Reads the schema only (the file's footer); pyarrow is imported
    here, when a file is checked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        return f"{path} is not a readable parquet file ({e})"
    if column not in schema.names:
        return (
            f"{path} has no column {column!r} (columns: {schema.names}); BioNeMo's layout: "
            f"{DataConfig._LAYOUT}"
        )
    kind = schema.field(column).type
    is_str = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if is_str(kind) or (is_list and is_str(kind.value_type)):
        return None
    return f"column {column!r} of {path} has type {kind}; expected a string id or a list of them"


_FOOTER_MAX = 64 << 20  # a parquet footer larger than this is not read by the launcher


def parquet_names(path: str | Path, name: str) -> bool | None:
    """Whether the parquet file's footer (which holds its schema) contains `name`: False means
    the file certainly has no such column, True that it may (the loader's id_column_problem,
    through pyarrow, decides), None that the footer could not be read. Bytes only, no pyarrow:
    importing it takes 0.17 s, half of a submit (benchmarks/results/submit_latency.md)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - 8))
            tail = f.read(8)
            length = int.from_bytes(tail[:4], "little")
            if len(tail) < 8 or tail[4:] != PARQUET_MAGIC or not 0 < length <= _FOOTER_MAX:
                return None
            f.seek(max(0, size - 8 - length))
            footer = f.read(length)
    except OSError:
        return None
    return name.encode() in footer


def _check_files(data, make: str) -> None:
    for key, kind in data.file_kinds().items():
        path = getattr(data, key)
        problem = None if path is None else input_problem(path, kind)
        if problem:
            error = ValueError if Path(path).exists() else FileNotFoundError
            raise error(f"data.{key}: {problem}; {make} or point data.{key} at {_KINDS[kind]}")


class DataConfig(Section):
    # BioNeMo's UniRef layout: clusters parquet (column ur90_id, a list per UniRef50 cluster),
    # validation parquet (column ur50_id) and SQLite protein(id TEXT PRIMARY KEY, sequence TEXT).
    train_clusters: Path = Field(
        Path("data/sample/train_clusters.parquet"),
        description="training clusters parquet (ur90_id lists)",
    )
    valid_clusters: Path | None = Field(
        Path("data/sample/valid_clusters.parquet"),
        description=("validation parquet (column ur50_id); null: no validation"),
    )
    database: Path = Field(
        Path("data/sample/proteins.sqlite"),
        description=("SQLite protein(id TEXT PRIMARY KEY, sequence TEXT)"),
    )
    mask_prob: float = Field(0.15, gt=0, lt=1, description="fraction of positions masked (MLM)")
    mask_token_prob: float = Field(0.8, ge=0, le=1, description="of masked positions: <mask>")
    random_token_prob: float = Field(0.1, ge=0, le=1, description="of masked positions: random")
    random_token_pool: Literal["all_tokens", "amino_acids_only"] = Field(
        "all_tokens", description=("where random replacement tokens come from")
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    pad_to: Literal["longest", "max_length", "none"] = Field(
        "longest",
        description=(
            '"longest": pad each batch to its longest sequence (rounded up to 8); "max_length": '
            'always to model.seq_length (what throughput tables quote as padded tokens); "none": no '
            "padding, the micro batch's sequences are packed into one row and attend within their own "
            "sequence only (variable-length flash attention): all compute goes to real tokens."
        ),
    )
    seed: int = Field(42, description="seed of sampling and masking")

    @model_validator(mode="after")
    def _probs(self) -> "DataConfig":
        if self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError("mask_token_prob + random_token_prob must be <= 1")
        return self

    @property
    def validation_set(self) -> Path | None:
        return self.valid_clusters

    def file_kinds(self) -> dict[str, str]:
        """What each path-valued key must be (input_problem's `kind`)."""
        return {"train_clusters": "parquet", "valid_clusters": "parquet", "database": "sqlite"}

    _LAYOUT: ClassVar[str] = (
        "ur90_id (a list of member ids) in the train file, ur50_id in the validation file"
    )
    # the column of member ids each clusters file must have (BioNeMo's UniRef layout)
    ID_COLUMNS: ClassVar[dict[str, str]] = {
        "train_clusters": "ur90_id",
        "valid_clusters": "ur50_id",
    }

    def problems(self, base: Path | None = None) -> list[tuple[str, str, str]]:
        """(key, problem, fix) for each clusters file (present, a parquet file) whose schema
        does not name its id column: the launcher's check before submit, on the file's bytes;
        the loader checks the column's type too (id_column_problem)."""
        out = []
        for key, column in self.ID_COLUMNS.items():
            path = getattr(self, key)
            if path is None:
                continue
            full = path if path.is_absolute() or base is None else base / path
            if input_problem(full, "parquet") is None and parquet_names(full, column) is False:
                bad = f"{full} has no column {column!r} (BioNeMo's layout: {self._LAYOUT})"
                out.append((key, bad, f"point it at a parquet file with a {column} column"))
        return out

    def check_files(self) -> None:
        """Raise FileNotFoundError (missing) or ValueError (unusable) naming the key of the
        first bad data file."""
        _check_files(self, "run `make data` for the sample set")


def read_vocab_tokens(path, key: str = "data.vocab") -> dict[str, int]:
    """A gene vocabulary file's tokens (token -> id): JSON {token: id} or [token, ...], or text
    with one token a line (its line number is the id). Checked further by
    bionemo.data.cells_tokenizer.GeneVocab; here so that the launcher can count them."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FileNotFoundError(
            f"{key}: cannot read {path} ({e.strerror}); run `make data MODEL=geneformer_10m` "
            f"for the sample set or point {key} at the data set's vocabulary"
        ) from None
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}: {path} is not valid JSON ({e})") from None
        tokens = {t: i for i, t in enumerate(raw)} if isinstance(raw, list) else raw
        if not isinstance(tokens, dict) or not all(isinstance(i, int) for i in tokens.values()):
            raise ValueError(f"{key}: {path} must hold {{token: id}} or a list of tokens")
        return tokens
    # vocab.txt, as the recipe ships it: the line number is the id
    return {t: i for i, t in enumerate(line.strip() for line in text.splitlines())}


class CellDataConfig(Section):
    """Geneformer's single-cell data: SCDL memory-mapped stores (built from .h5ad) or the recipe's
    parquet of pre-tokenized `input_ids`; the gene vocabulary and per-gene medians ship with it."""

    format: Literal["scdl", "parquet"] = Field(
        "scdl", description=("scdl (memory-mapped stores from .h5ad) or parquet of input_ids")
    )
    train: Path = Field(Path("data/geneformer_sample/train"), description="SCDL folder or parquet")
    valid: Path | None = Field(
        Path("data/geneformer_sample/valid"),
        description=("validation store or parquet; null: no validation"),
    )
    vocab: Path = Field(Path("data/geneformer_sample/vocab.json"), description="token -> id")
    gene_medians: Path = Field(
        Path("data/geneformer_sample/gene_medians.json"), description=("Ensembl id -> median")
    )
    normalize_total: float = Field(10_000.0, gt=0, description="counts per cell, pre-median")
    mask_prob: float = Field(0.15, gt=0, lt=1, description="fraction of genes masked (MLM)")
    mask_token_prob: float = Field(0.8, ge=0, le=1, description="of masked positions: <mask>")
    random_token_prob: float = Field(0.1, ge=0, le=1, description="of masked positions: random")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    pad_to: Literal["longest", "max_length", "none"] = Field("longest", description="as for ESM-2")
    seed: int = Field(42, description="seed of sampling and masking")

    @property
    def validation_set(self) -> Path | None:
        return self.valid

    def file_kinds(self) -> dict[str, str]:
        store = "scdl" if self.format == "scdl" else "parquet"
        return {"train": store, "valid": store, "vocab": "file", "gene_medians": "file"}

    def check_files(self) -> None:
        _check_files(self, "run `make data MODEL=geneformer_10m` for the sample set")


TASK_KINDS = ("mlm", "sequence_regression", "sequence_classification", "token_classification")


class TaskConfig(Section):
    """What the run trains: "mlm" (pretraining, the default) or a fine-tuning task on a labelled
    table (bionemo/finetune.py, bionemo/data/labelled.py). Fine-tuning reads `data` here instead of
    trainer.data's files (trainer.data's seed, pad_to and num_workers still apply)."""

    kind: Literal[
        "mlm", "sequence_regression", "sequence_classification", "token_classification"
    ] = Field("mlm", description="mlm: pretraining")
    data: Path | None = Field(None, description=".csv or .parquet, one row per sequence")
    sequence_column: str = Field("sequence", description="the table's column of sequences")
    label_column: str = Field(
        "label",
        description=(
            "sequence_regression: a number; sequence_classification: an int class id "
            "(0..num_classes-1) or a class name; token_classification: a string with one class "
            "character per residue, or a list (int ids or names) with one entry per residue."
        ),
    )
    num_classes: int | None = Field(None, ge=2, description="checked against labels")
    valid_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description=(
            "Rows whose hash of (data.seed, row number) falls below this are validation rows: the "
            "split depends on neither the row order of other rows nor the world size."
        ),
    )
    pooling: Literal["mean", "cls"] = Field(
        "mean",
        description=(
            'Sequence tasks: "mean" over the residues (not <cls>/<eos>/padding) or the <cls> state.'
        ),
    )
    freeze_encoder: bool = Field(False, description="train the head only")
    head_lr: float | None = Field(
        None,
        gt=0,
        description=("The head's peak learning rate (default optim.lr), on the same schedule."),
    )
    head_dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the task head")

    @property
    def fine_tuning(self) -> bool:
        return self.kind != "mlm"

    @property
    def validation_set(self) -> bool:
        return self.fine_tuning and self.valid_fraction > 0

    def problems(self, base: Path | None = None) -> list[tuple[str, str, str]]:
        """(key under task, problem, fix) for each reason the labelled table cannot serve this
        task; torch-free (pyarrow reads the header, or the label column). Relative paths are
        resolved against `base` (the launcher's cluster.workdir; the trainer's cwd)."""
        from bionemo.data.labelled import table_problems

        return table_problems(self, base)

    def check_files(self) -> None:
        """The trainer's check before start-up: ValueError naming the first bad key."""
        for key, problem, fix in self.problems():
            raise ValueError(f"task.{key}: {problem}; {fix}")
