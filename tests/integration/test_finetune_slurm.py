"""A fine-tuning job through `python -m launchers submit` on the bundled cluster: 2 nodes x 1
rank (gloo), sequence classification on a labelled CSV, started from a Hugging Face folder of
the same shrunk shape; it finishes with validation accuracy in metrics.jsonl and the encoder
exported with its head in final_model/."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pacsv

from bionemo import rundir
from tests.integration._runs import SMALL, assert_finished, logs, runs  # noqa: F401 -- fixture
from tests.test_finetune import labelled_rows

STEPS = 20


def test_fine_tune_job_runs_through_submit(runs, tmp_path):  # noqa: F811
    import torch

    from bionemo import hf
    from bionemo.config import ModelConfig
    from bionemo.models import build_model

    table = tmp_path / "labels.csv"
    pacsv.write_csv(pa.table(labelled_rows(200, seed=5)), table)
    shape = ModelConfig(
        name="esm2_8m",
        num_layers=2,
        hidden_size=320,
        num_attention_heads=20,
        ffn_hidden_size=1280,
        seq_length=128,
    )
    torch.manual_seed(0)
    init = hf.export(build_model(shape), tmp_path / "hf_init")  # stands in for a published model

    out = runs.cli(
        "submit",
        "--backend",
        "sbatch",
        "--model",
        "esm2_8m",
        "--cluster",
        "local",
        "--nodes",
        "2",
        f"cluster.runs_root={runs.runs_root}",
        "job.experiment=finetune",
        "job.run=classify",
        *SMALL,
        f"max_steps={STEPS}",
        "trainer.train.val_every=10",
        "trainer.train.limit_val_batches=1",
        "trainer.checkpoint.every_steps=10",
        "trainer.task.kind=sequence_classification",
        f"trainer.task.data={table}",
        "trainer.task.label_column=band",
        "trainer.task.num_classes=3",
        f"trainer.checkpoint.init_from={init}",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = runs.runs_root / "finetune" / "classify"
    from launchers import record

    job_id = record.job_ids(record.load(run_dir))[-1]
    runs.releaser.jobs.add(job_id)
    rec = runs.wait_final(job_id, timeout=240)
    assert rec["JobState"] == "COMPLETED", logs(run_dir)
    assert_finished(run_dir, STEPS)
    assert "initialised weights from" in logs(run_dir, tail=None)
    valid = [json.loads(line) for line in (run_dir / rundir.METRICS).read_text().splitlines()]
    valid = [r for r in valid if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [10, 20] and all(0 <= r["accuracy"] <= 1 for r in valid)
    final = run_dir / "final_model"
    assert {"model.safetensors", "config.json", "head.safetensors", "head_config.json"} <= {
        p.name for p in final.iterdir()
    }
    assert json.loads((final / "head_config.json").read_text())["id2label"]["0"] == "high"
