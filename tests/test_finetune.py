"""Fine-tuning (trainer.task): it learns a known signal, resumes bit-exactly after the warning
signal, and bad input is refused before anything is submitted.

The model is ESM-2 shrunk for CI's two cores (2 layers, hidden 64, 4 heads, 64 tokens, as in
test_resume.py); the sets are synthetic with a signal that a head on the encoder can find:
regression and sequence classes from the fraction of hydrophobic residues, token classes from
each residue's identity.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from bionemo import rundir
from bionemo.config import REQUEUE_EXIT_CODE, TaskConfig
from bionemo.data.labelled import LabelledTable, split_mask
from tests.test_resume import assert_bitwise_equal, launch, train_losses, wait_all

AMINO = "LAGVSERTIDPKQNFYMHWC"
HYDROPHOBIC = set("LIVFMWA")
CHARGED = set("DEKR")


def labelled_rows(n: int, seed: int = 0) -> dict[str, list]:
    """Sequences of 20-59 residues whose hydrophobic fraction f varies from row to row; labels:
    tm = 50 + 10 f (regression, not centred: the head's standardization must cope), band =
    low/mid/high by f (classes by name), kinds = h/c/o per residue (hydrophobic, charged, other)."""
    rng = np.random.default_rng(seed)
    hyd = [a for a in AMINO if a in HYDROPHOBIC]
    other = [a for a in AMINO if a not in HYDROPHOBIC]
    rows: dict[str, list] = {"sequence": [], "tm": [], "band": [], "kinds": []}
    for _ in range(n):
        p = rng.uniform(0.1, 0.9)
        seq = "".join(
            rng.choice(hyd) if rng.random() < p else rng.choice(other)
            for _ in range(int(rng.integers(20, 60)))
        )
        f = sum(c in HYDROPHOBIC for c in seq) / len(seq)
        rows["sequence"].append(seq)
        rows["tm"].append(50 + 10 * f)
        rows["band"].append("low" if f < 0.37 else "mid" if f < 0.63 else "high")
        rows["kinds"].append(
            "".join("h" if c in HYDROPHOBIC else "c" if c in CHARGED else "o" for c in seq)
        )
    return rows


@pytest.fixture(scope="module")
def table_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.csv"
    pacsv.write_csv(pa.table(labelled_rows(400)), path)
    return path


def trainer_config(data: Path, kind: str, label: str, **task) -> dict:
    classes = {} if kind == "sequence_regression" else {"num_classes": 3}
    return {
        "trainer": {
            "model": {
                "name": "tiny",
                "num_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "ffn_hidden_size": 128,
                "seq_length": 64,
            },
            "optim": {"warmup_steps": 10, "lr": 3e-3},
            "train": {
                "micro_batch_size": 16,
                "max_steps": 60,
                "log_every": 20,
                "val_every": 60,
                "precision": "fp32",
                "device": "cpu",
            },
            "checkpoint": {"every_steps": 60, "keep_last": 1},
            "task": {
                "kind": kind,
                "data": str(data),
                "label_column": label,
                "valid_fraction": 0.25,
                **classes,
                **task,
            },
        }
    }


def write_run(path: Path, cfg: dict) -> Path:
    path.mkdir(parents=True)
    (path / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
    return path


def records(run_dir: Path, kind: str) -> dict[int, dict]:
    lines = (run_dir / rundir.METRICS).read_text().splitlines()
    return {
        r["step"]: {k: v for k, v in r.items() if k != "time"}
        for r in map(json.loads, lines)
        if r["kind"] == kind
    }


# ---------------------------------------------------------------------------- it learns


# What a trivial predictor scores on the same validation rows, and the margin required.
@pytest.mark.parametrize(
    "kind,label",
    [
        ("sequence_regression", "tm"),
        ("sequence_classification", "band"),
        ("token_classification", "kinds"),
    ],
)
def test_fine_tuning_beats_a_trivial_baseline(tmp_path, table_csv, kind, label):
    from bionemo.export import export_checkpoint
    from bionemo.trainer import train

    cfg = trainer_config(table_csv, kind, label)
    run = write_run(tmp_path / kind, cfg)
    assert train(run) == 0
    valid = records(run, "valid")[60]

    table = LabelledTable(TaskConfig.model_validate(cfg["trainer"]["task"]), seed=42)
    train_rows, valid_rows = table.rows["train"], table.rows["valid"]
    if kind == "sequence_regression":
        y = table.labels[valid_rows]
        baseline = float(np.mean((y - table.labels[train_rows].mean()) ** 2))  # mean predictor
        assert valid["mse"] < 0.1 * baseline, (valid, baseline)  # 10x better than the mean
        assert valid["pearson"] > 0.9 and valid["spearman"] > 0.9, valid
    else:
        per_row = [table.labels[r] for r in valid_rows]
        flat = [x for row in per_row for x in row] if kind == "token_classification" else per_row
        majority = np.bincount(flat).max() / len(flat)  # always the most common class
        assert valid["accuracy"] > majority + 0.25, (valid, majority)

    # final_model/: the encoder as a Hugging Face folder, the head beside it; the on-demand
    # export of the same checkpoint writes the same files.
    final = run / "final_model"
    head = json.loads((final / "head_config.json").read_text())
    assert head["task"] == kind and (final / "model.safetensors").is_file()
    if kind == "sequence_classification":
        assert head["id2label"] == {"0": "high", "1": "low", "2": "mid"}
    again = export_checkpoint(rundir.step_dir(run, 60), run / rundir.CONFIG, tmp_path / "again")
    for name in ("model.safetensors", "head.safetensors", "head_config.json"):
        assert (again / name).read_bytes() == (final / name).read_bytes(), name


def test_split_is_deterministic_and_labels_load_from_parquet_lists(tmp_path):
    mask = split_mask(10_000, seed=42, valid_fraction=0.1)
    assert np.array_equal(mask, split_mask(10_000, seed=42, valid_fraction=0.1))
    assert abs(mask.mean() - 0.1) < 0.01
    assert not np.array_equal(mask, split_mask(10_000, seed=43, valid_fraction=0.1))
    assert np.array_equal(mask[:100], split_mask(100, seed=42, valid_fraction=0.1))  # per row

    rows = labelled_rows(40)
    ids = {"h": 0, "c": 1, "o": 2}
    path = tmp_path / "tokens.parquet"
    pq.write_table(
        pa.table({"seq": rows["sequence"], "y": [[ids[c] for c in k] for k in rows["kinds"]]}), path
    )
    task = TaskConfig(
        kind="token_classification",
        data=path,
        sequence_column="seq",
        label_column="y",
        num_classes=3,
    )
    table = LabelledTable(task, seed=1)
    assert table.class_names is None and table.labels[0] == [ids[c] for c in rows["kinds"][0]]
    short = tmp_path / "short.parquet"
    pq.write_table(pa.table({"seq": ["LLA"], "y": [[0, 1]]}), short)
    with pytest.raises(ValueError, match="task.label_column: row 0 .* 2 labels for 3 residues"):
        LabelledTable(task.model_copy(update={"data": short}), seed=1)


# ---------------------------------------------------------------------------- exact resume


def test_signal_stop_and_resume_is_bitwise_exact(tmp_path, table_csv):
    """2 gloo ranks; head dropout on, so the per-rank RNG states must come back too."""
    cfg = trainer_config(table_csv, "sequence_regression", "tm", head_lr=1e-2, head_dropout=0.2)
    cfg["trainer"]["train"].update(micro_batch_size=4, max_steps=30, log_every=1, val_every=10)
    cfg["trainer"]["checkpoint"].update(every_steps=10, keep_last=2)
    ref = write_run(tmp_path / "uninterrupted", cfg)
    assert wait_all(launch(ref, world=2)) == [0, 0]

    run = write_run(tmp_path / "stopped", cfg)
    stop_at = random.Random(time.time_ns()).randint(3, 22)
    procs = launch(run, world=2, BIONEMO_STEP_SLEEP="0.2")
    deadline = time.time() + 240
    while time.time() < deadline:
        if (run / rundir.METRICS).exists() and max(train_losses(run), default=0) >= stop_at:
            break
        assert all(p.poll() is None for p in procs), "training ended before the signal"
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGUSR2)
    assert wait_all(procs) == [REQUEUE_EXIT_CODE] * 2, f"stopped after step {stop_at}"
    assert stop_at <= rundir.latest_complete_step(run) < 30
    assert wait_all(launch(run, world=2)) == [0, 0]

    assert train_losses(run) == train_losses(ref)
    assert records(run, "valid") == records(ref, "valid") and len(records(ref, "valid")) == 3
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    import torch

    final = {}
    for r in (ref, run):
        dcp_to_torch_save(rundir.step_dir(r, 30), tmp_path / f"{r.name}.pt")
        final[r.name] = torch.load(tmp_path / f"{r.name}.pt", weights_only=False)
    assert any(k.startswith("head.") for k in final["stopped"]["model"])
    assert_bitwise_equal(final["stopped"], final["uninterrupted"])


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides,key,words",
    [
        (["trainer.task.label_column=nope"], "trainer.task.label_column", "has no column 'nope'"),
        (
            [
                "trainer.task.kind=sequence_regression",
                "trainer.task.num_classes=null",
                "trainer.task.label_column=band",
            ],
            "trainer.task.label_column",
            "sequence_regression needs a number",
        ),
        (["trainer.task.kind=regression"], "trainer.task.kind", "input should be 'mlm'"),
        (["trainer.task.num_classes=2"], "trainer.task.num_classes", "3 classes"),
        (["trainer.task.data=labels.txt"], "trainer.task.data", "not a .csv or .parquet"),
        (["trainer.train.engine=megatron"], "trainer.task.kind", "torch engine only"),
    ],
)
def test_bad_task_input_is_refused_before_submitting(
    tmp_path, table_csv, fake_slurm, capsys, overrides, key, words
):
    from launchers import cli

    runs = tmp_path / "runs"
    rc = cli.main(
        [
            "submit",
            "--model",
            "esm2_8m",
            "--cluster",
            "local",
            "--nodes",
            "1",
            f"cluster.runs_root={runs}",
            "trainer.task.kind=sequence_classification",
            f"trainer.task.data={table_csv}",
            "trainer.task.label_column=band",
            "trainer.task.num_classes=3",
            *overrides,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: command line: {key}: "), err
    assert words in err, err
    assert not runs.exists() and not fake_slurm.calls()


from tests.test_cli import fake_slurm  # noqa: E402,F401 -- the fixture: sbatch that records calls
