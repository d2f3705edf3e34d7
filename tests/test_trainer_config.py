"""The trainer's own checks of bad input: each error names the field and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from bionemo.config import (
    MAX_SEQ_LENGTH,
    DuplicateKeyError,
    TrainerConfig,
    input_problem,
    load_trainer_config,
)

MODEL = {
    "name": "t",
    "num_layers": 1,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "ffn_hidden_size": 64,
}


def cfg(**sections) -> dict:
    base = {"model": dict(MODEL), "train": {"micro_batch_size": 2}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


@pytest.mark.parametrize(
    "sections, needle",
    [
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
        ({"train": {"micro_batch_size": -3}}, "train.micro_batch_size"),
        ({"model": {"seq_length": 2}}, "model.seq_length"),
        ({"model": {"hidden_size": 30}}, "num_attention_heads"),
        ({"train": {"max_step": 10}}, "train.max_step"),  # typo of max_steps
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"data": {"random_token_pool": "amino"}}, "data.random_token_pool"),
    ],
)
def test_schema_rejects_with_field_name(sections, needle):
    with pytest.raises(ValidationError) as err:
        TrainerConfig.model_validate(cfg(**sections))
    text = str(err.value).replace("\n", ".")
    assert needle.split(".")[-1] in text and needle.split(".")[0] in text


def test_missing_data_file_names_key_and_fix(tmp_path):
    c = TrainerConfig.model_validate(
        cfg(
            data={
                "database": str(tmp_path / "nope.sqlite"),
                "train_clusters": str(tmp_path / "x.parquet"),
            }
        )
    )
    with pytest.raises(FileNotFoundError, match=r"data\.train_clusters: .*make data"):
        c.data.check_files()


SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
CELLS = SAMPLE.parent / "geneformer_sample"


def test_data_files_are_checked_for_type_and_magic_bytes(tmp_path):
    """A folder, a device, an empty file or the other format at a data key is refused by the
    same cheap check the launcher runs before submitting (bionemo.config.input_problem)."""
    parquet, sqlite = SAMPLE / "train_clusters.parquet", SAMPLE / "proteins.sqlite"
    assert input_problem(parquet, "parquet") is None and input_problem(sqlite, "sqlite") is None
    assert input_problem(CELLS / "train", "scdl") is None
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "cut.parquet").write_bytes(parquet.read_bytes()[:-1])  # a cut-off copy
    for path, kind, says in [
        (tmp_path, "parquet", "is a folder, not a parquet file"),
        ("/dev/null", "parquet", "is not a regular file"),
        (sqlite, "parquet", "not a parquet file (its first bytes say: an SQLite database)"),
        (tmp_path / "cut.parquet", "parquet", "not a whole parquet file (no PAR1 footer"),
        (parquet, "sqlite", "not an SQLite database (its first bytes say: a parquet file)"),
        (tmp_path / "empty", "sqlite", "(its first bytes say: empty)"),
        (tmp_path, "scdl", "is not an SCDL store"),  # a folder without metadata.json
        (CELLS / "vocab.json", "scdl", "is not an SCDL store"),
        (CELLS / "train", "file", "is a folder, not a regular file"),
        (tmp_path / "nope", "file", "does not exist"),
    ]:
        assert says in input_problem(path, kind), (path, kind)
    c = TrainerConfig.model_validate(cfg(data={"train_clusters": str(sqlite)}))
    with pytest.raises(ValueError, match=r"data\.train_clusters: .* is not a parquet file"):
        c.data.check_files()


def test_a_clusters_file_without_its_id_column(tmp_path):
    """The launcher reads the parquet footer's bytes (no pyarrow, so submit stays fast): a
    column name they lack is certainly missing. The loader checks names and types (pyarrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bionemo.config_data import DataConfig, id_column_problem, parquet_names

    train = SAMPLE / "train_clusters.parquet"
    assert parquet_names(train, "ur90_id") is True and parquet_names(train, "ur100_id") is False
    assert parquet_names(SAMPLE / "proteins.sqlite", "ur90_id") is None  # not a parquet file
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"foo": ["a"]}), wrong)
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"ur50_id": [1]}), ints)
    data = DataConfig(train_clusters=wrong, valid_clusters=ints)
    ((key, text, fix),) = data.problems()  # the int column's name is there: the loader's part
    assert key == "train_clusters" and "has no column 'ur90_id'" in text and "ur90_id" in fix
    assert "has no column 'ur90_id' (columns: ['foo'])" in id_column_problem(wrong, "ur90_id")
    assert "has type int64; expected a string id" in id_column_problem(ints, "ur50_id")
    assert id_column_problem(train, "ur90_id") is None
    assert DataConfig().problems(SAMPLE.parents[1]) == []  # the sample set, relative paths


def test_sequence_length_is_bounded():
    assert TrainerConfig.model_validate(cfg(model={"seq_length": MAX_SEQ_LENGTH}))
    with pytest.raises(ValidationError, match="titin"):
        TrainerConfig.model_validate(cfg(model={"seq_length": MAX_SEQ_LENGTH + 1}))


def test_trainer_refuses_a_key_given_twice(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "trainer:\n  model: {name: t, num_layers: 1, hidden_size: 32,\n"
        "    num_attention_heads: 4, ffn_hidden_size: 64}\n"
        "  train:\n    micro_batch_size: 2\n    micro_batch_size: 4\n"
    )
    with pytest.raises(
        DuplicateKeyError,
        match=r"trainer\.train\.micro_batch_size: given twice "
        r"\(lines 5 and 6\)",
    ):
        load_trainer_config(path)


def test_global_batch_must_be_a_multiple():
    c = TrainerConfig.model_validate(cfg(train={"global_batch_size": 10, "micro_batch_size": 4}))
    with pytest.raises(ValueError, match="train.global_batch_size 10 is not a multiple"):
        c.check_parallel(world_size=1)
    assert (
        TrainerConfig.model_validate(
            cfg(train={"global_batch_size": 16, "micro_batch_size": 4})
        ).check_parallel(world_size=2)
        == 2
    )


def test_tensor_parallel_must_divide_world_and_heads():
    megatron = {"engine": "megatron", "micro_batch_size": 2}
    with pytest.raises(ValueError, match="does not divide the world size 3"):
        TrainerConfig.model_validate(cfg(parallel={"tensor": 2}, train=megatron)).check_parallel(3)
    # the head count is checked by the schema, before the device: on CPU too it is what is wrong
    for train in (megatron, {**megatron, "device": "cpu"}):
        with pytest.raises(
            ValueError, match="parallel.tensor=8 does not divide model.num_attention_heads 4"
        ):
            TrainerConfig.model_validate(cfg(parallel={"tensor": 8}, train=train))


@pytest.mark.parametrize(
    "sections, needle",
    [
        (
            {"parallel": {"tensor": 2}},
            "parallel.tensor=2 parallel.pipeline=1 need train.engine=megatron",
        ),
        ({"parallel": {"pipeline": 2}}, "need train.engine=megatron"),
        ({"train": {"engine": "megatron", "device": "cpu"}}, "train.engine=megatron needs CUDA"),
        ({"train": {"engine": "megatron"}, "data": {"pad_to": "none"}}, "data.pad_to=none"),
        (
            {
                "train": {"engine": "megatron"},
                "parallel": {"pipeline": 2},
                "data": {"pad_to": "max_length"},
            },
            "num_layers 1 is not divisible",
        ),
        (
            {"train": {"engine": "megatron"}, "parallel": {"pipeline": 2}},
            "data.pad_to must be max_length",
        ),
        (
            {
                "train": {"engine": "megatron"},
                "model": {"family": "geneformer", "token_dropout": False},
            },
            "builds ESM-2 only",
        ),
    ],
)
def test_engine_layout_checks(sections, needle):
    with pytest.raises(ValueError, match=needle):
        TrainerConfig.model_validate(cfg(**sections))


def test_init_from_that_is_not_a_checkpoint(tmp_path):
    import torch

    from bionemo.checkpoint import load_weights

    (tmp_path / "some_folder").mkdir()
    with pytest.raises(ValueError, match="checkpoint.init_from: .* is not a complete checkpoint"):
        load_weights(tmp_path / "some_folder", torch.nn.Linear(2, 2))


def test_train_entry_point_without_config(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bionemo.train", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "config.yaml does not exist" in out.stderr
