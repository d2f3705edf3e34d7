"""Labelled sequences for fine-tuning (trainer.task): a CSV or parquet table, one row per sequence.

Columns: `task.sequence_column` (residues) and `task.label_column`: a number (sequence_regression),
a class id or name (sequence_classification), or one class per residue (token_classification: a
string with one character per residue, or a list with one entry per residue). Class names map to
ids in sorted order; the names are exported with the head (head_config.json).

Split: row r is a validation row when a hash of (data.seed, r) falls below task.valid_fraction,
so the split is fixed by the file and the seed alone. Samples follow the pretraining rule
(bionemo.data.dataset.EpochOrder): global sample g of the training split is row
permutation(seed, g // N)[g % N] of its N rows, so the stop protocol and exact resume need only
the consumed-samples count, as in pretraining. Sequences longer than model.seq_length - 2
residues are cut to their first seq_length - 2 (token labels likewise); <cls> and <eos> wrap them.

Torch-free at import: the launcher runs `table_problems` (pyarrow only) before submitting.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from bionemo.data.masking import IGNORE_INDEX
from bionemo.data.tokenizer import CLS_ID, EOS_ID, PAD_ID, encode

SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_SPLIT_SALT = 0x5F1A_B1E5  # keeps the split's hash stream apart from any other use of the seed


def _path(task, base: Path | None) -> Path:
    p = Path(task.data)
    return p if p.is_absolute() or base is None else Path(base) / p


def _read(path: Path, fmt: str, columns: list[str] | None, strings: list[str]):
    """The table (only `columns`; None: the schema alone) with `strings` read as text (CSV type
    inference would turn token labels such as "0110" into integers)."""
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(path) if columns is None else pq.read_table(path, columns=columns)
    from pyarrow import csv

    convert = csv.ConvertOptions(
        column_types={c: pa.string() for c in strings}, include_columns=columns
    )
    if columns is None:  # the header and the first block only: names and inferred types
        with csv.open_csv(path, convert_options=convert) as reader:
            return reader.schema
    return csv.read_csv(path, convert_options=convert)


def _label_type_problem(kind: str, t) -> str | None:
    import pyarrow as pa

    text = pa.types.is_string(t) or pa.types.is_large_string(t)
    number = pa.types.is_integer(t) or pa.types.is_floating(t)
    if kind == "sequence_regression" and not number:
        return f"has type {t}; sequence_regression needs a number per row"
    if kind == "sequence_classification" and not (text or pa.types.is_integer(t)):
        return f"has type {t}; sequence_classification needs an integer class id or a class name"
    if kind == "token_classification":
        is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
        inner = t.value_type if is_list else None
        if not (
            text
            or (
                is_list
                and (
                    pa.types.is_integer(inner)
                    or pa.types.is_string(inner)
                    or pa.types.is_large_string(inner)
                )
            )
        ):
            return (
                f"has type {t}; token_classification needs a string (one class character "
                f"per residue) or a list of class ids or names per residue"
            )
    return None


def table_problems(task, base: Path | None = None) -> list[tuple[str, str, str]]:
    """(key under trainer.task, problem, fix) for each reason the table cannot serve the task.
    Reads the schema (parquet footer, or a CSV's header and first block) and, for
    classification, the label column (to check task.num_classes)."""
    from bionemo.config import input_problem

    path = _path(task, base)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        return [
            (
                "data",
                f"{path} is not a .csv or .parquet file",
                "point trainer.task.data at a .csv or .parquet table",
            )
        ]
    bad = input_problem(path, "parquet" if fmt == "parquet" else "file")
    if bad:
        return [("data", bad, "point trainer.task.data at your labelled table")]
    seq, lab = task.sequence_column, task.label_column
    try:
        schema = _read(path, fmt, None, [seq] + ([lab] if _text_labels(task) else []))
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for unreadable files
        return [
            ("data", f"{path} cannot be read as {fmt} ({str(e).splitlines()[0]})", "check the file")
        ]
    problems = []
    for key, column in (("sequence_column", seq), ("label_column", lab)):
        if column not in schema.names:
            problems.append(
                (
                    key,
                    f"{path} has no column {column!r} (columns: {', '.join(schema.names)})",
                    f"set trainer.task.{key} to one of them",
                )
            )
    if problems:
        return problems
    import pyarrow as pa

    seq_type = schema.field(seq).type
    if not (pa.types.is_string(seq_type) or pa.types.is_large_string(seq_type)):
        problems.append(
            (
                "sequence_column",
                f"column {seq!r} of {path} has type {seq_type}, not text",
                "point trainer.task.sequence_column at the residues",
            )
        )
    bad = _label_type_problem(task.kind, schema.field(lab).type)
    if bad:
        problems.append(
            (
                "label_column",
                f"column {lab!r} of {path} {bad}",
                "point trainer.task.label_column at such a column, or set trainer.task.kind",
            )
        )
    if not problems and task.kind != "sequence_regression":
        text = [lab] if _text_labels(task) else []
        try:
            column = _read(path, fmt, [lab], text).column(lab)
        except Exception as e:  # noqa: BLE001 -- as above
            return [
                (
                    "data",
                    f"column {lab!r} of {path} cannot be read ({str(e).splitlines()[0]})",
                    "check the file",
                )
            ]
        try:
            _classes(task, _labels(column))
        except ValueError as e:
            key, _, rest = str(e).partition(": ")
            problem, _, fix = rest.partition("; ")
            problems.append((key.removeprefix("task."), problem, fix))
    return problems


def _text_labels(task) -> bool:
    """CSV label columns read as text: token labels (a string per sequence)."""
    return task.kind == "token_classification"


def _labels(column) -> list:
    if column.null_count:
        raise ValueError(
            f"task.label_column: {column.null_count} rows have no label; drop them or fill them in"
        )
    return column.to_pylist()


def _classes(task, labels: list) -> tuple[list, list[str] | None]:
    """Labels as class ids (per row; token tasks: a list per row) and the class names (None when
    the labels are ids already). Raises ValueError naming task.num_classes when they disagree."""
    token = task.kind == "token_classification"
    flat = [x for row in labels for x in row] if token else labels
    if not flat:
        return labels, None
    if isinstance(flat[0], str):
        names = sorted(set(flat))
        if len(names) > task.num_classes:
            shown = ", ".join(map(repr, names[:12])) + (" ..." if len(names) > 12 else "")
            raise ValueError(
                f"task.num_classes: the labels name {len(names)} classes ({shown}), "
                f"more than task.num_classes={task.num_classes}; set "
                f"task.num_classes={len(names)}"
            )
        index = {n: i for i, n in enumerate(names)}
        ids = [[index[x] for x in row] for row in labels] if token else [index[x] for x in labels]
        return ids, names
    lo, hi = min(flat), max(flat)
    if lo < 0 or hi >= task.num_classes:
        raise ValueError(
            f"task.num_classes: class ids run from {lo} to {hi}, outside 0.."
            f"{task.num_classes - 1}; set task.num_classes={hi + 1} (ids must "
            f"start at 0)"
        )
    return labels, None


def split_mask(n: int, seed: int, valid_fraction: float) -> np.ndarray:
    """True for validation rows: splitmix64 of (seed, row) below valid_fraction * 2**64."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(seed ^ _SPLIT_SALT) * np.uint64(
            0x9E3779B97F4A7C15
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z < np.uint64(min(int(valid_fraction * 2**64), 2**64 - 1))


class LabelledTable:
    """The whole table in memory, checked, with labels as numbers and the split decided."""

    def __init__(self, task, seed: int, base: Path | None = None):
        problems = table_problems(task, base)
        if problems:
            key, problem, fix = problems[0]
            raise ValueError(f"task.{key}: {problem}; {fix}")
        path = _path(task, base)
        fmt = SUFFIXES[path.suffix.lower()]
        seq, lab = task.sequence_column, task.label_column
        table = _read(path, fmt, [seq, lab], [seq] + ([lab] if _text_labels(task) else []))
        if table.column(seq).null_count:
            raise ValueError(
                f"task.sequence_column: {table.column(seq).null_count} rows of "
                f"{path} have no sequence; drop them"
            )
        self.sequences: list[str] = table.column(seq).to_pylist()
        labels = _labels(table.column(lab))
        self.class_names = None
        if task.kind == "sequence_regression":
            self.labels = np.asarray(labels, dtype=np.float64)
        else:
            if task.kind == "token_classification":
                labels = [list(x) if isinstance(x, str) else x for x in labels]
            labels, self.class_names = _classes(task, labels)
            self.labels = labels
        for r, s in enumerate(self.sequences):
            if not s:
                raise ValueError(
                    f"task.sequence_column: row {r} of {path} is an empty sequence; drop it"
                )
            if task.kind == "token_classification" and len(self.labels[r]) != len(s):
                raise ValueError(
                    f"task.label_column: row {r} of {path} has {len(self.labels[r])} "
                    f"labels for {len(s)} residues; give one label per residue"
                )
        valid = split_mask(len(self.sequences), seed, task.valid_fraction)
        self.rows = {"train": np.flatnonzero(~valid), "valid": np.flatnonzero(valid)}
        if not len(self.rows["train"]):
            raise ValueError(
                f"task.valid_fraction: no training rows left of {len(valid)} in "
                f"{path}; lower task.valid_fraction"
            )
        if task.valid_fraction and not len(self.rows["valid"]):
            raise ValueError(
                f"task.valid_fraction: {task.valid_fraction} of {len(valid)} rows "
                f"gave no validation row; raise it, or set it to 0"
            )
        self.kind = task.kind

    def label_stats(self) -> tuple[float, float]:
        """Mean and standard deviation of the training rows' regression labels (the head
        predicts standardized labels; see bionemo.models.heads)."""
        y = self.labels[self.rows["train"]]
        return float(y.mean()), float(y.std()) or 1.0


def open_table(task, seed: int) -> LabelledTable:
    """The table of a task, read once per process while the file is unchanged (validation
    builds its loader anew at every evaluation)."""
    st = Path(task.data).stat()
    return _cached(task.model_dump_json(), seed, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _cached(task_json: str, seed: int, mtime_ns: int, size: int) -> LabelledTable:
    from bionemo.config import TaskConfig

    return LabelledTable(TaskConfig.model_validate_json(task_json), seed)


class LabelledDataset:
    """Samples of one split by global sample index g (map-style; any g >= 0)."""

    def __init__(self, table: LabelledTable, split: str, seq_length: int, seed: int):
        from bionemo.data.dataset import EpochOrder

        self.table, self.rows = table, table.rows[split]
        self.window = seq_length - 2  # room left by <cls> and <eos>
        self.epochs = EpochOrder(len(self.rows), seed, shuffle=split == "train")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, g: int) -> dict:
        _, i = self.epochs.locate(g)
        r = int(self.rows[i])
        residues = encode(self.table.sequences[r])[: self.window]
        item = {"input_ids": np.concatenate(([CLS_ID], residues, [EOS_ID]))}
        label = self.table.labels[r]
        if self.table.kind == "token_classification":
            inner = np.asarray(label[: self.window], dtype=np.int64)
            item["labels"] = np.concatenate(([IGNORE_INDEX], inner, [IGNORE_INDEX]))
        else:
            item["labels"] = np.asarray(
                label, dtype=np.float32 if self.table.kind == "sequence_regression" else np.int64
            )
        return item


def collate(batch: list[dict], pad_to: str = "longest", seq_length: int = 1024) -> dict:
    """input_ids (padded with <pad>), attention_mask (True = real) and labels: [B] per sequence,
    or [B, S] per token (IGNORE_INDEX on <cls>, <eos> and padding)."""
    import torch

    longest = max(len(s["input_ids"]) for s in batch)
    length = seq_length if pad_to == "max_length" else min(-(-longest // 8) * 8, seq_length)
    input_ids = np.full((len(batch), length), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((len(batch), length), dtype=bool)
    per_token = batch[0]["labels"].ndim == 1
    labels = (
        np.full((len(batch), length), IGNORE_INDEX, dtype=np.int64)
        if per_token
        else np.stack([s["labels"] for s in batch])
    )
    for i, s in enumerate(batch):
        n = len(s["input_ids"])
        input_ids[i, :n], attention_mask[i, :n] = s["input_ids"], True
        if per_token:
            labels[i, :n] = s["labels"]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
    }


def build_dataloader(
    data_cfg,
    seq_length: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    grad_accumulation: int,
    start_sample: int,
    split: str = "train",
    pad_to: str = "longest",
    *,
    task,
):
    """This rank's infinite loader of micro-batches of the task's `split` (the signature of
    bionemo.data.dataset.build_dataloader, plus the task section)."""
    from bionemo.data.dataset import GlobalBatchSampler, rank_loader

    table = open_table(task, data_cfg.seed)
    dataset = LabelledDataset(table, split, seq_length, data_cfg.seed)
    sampler = GlobalBatchSampler(
        start_sample, micro_batch_size, dp_rank, dp_size, grad_accumulation
    )
    return rank_loader(
        dataset,
        sampler,
        functools.partial(collate, pad_to=pad_to, seq_length=seq_length),
        data_cfg.num_workers,
    )
