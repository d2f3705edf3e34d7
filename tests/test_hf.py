"""Hugging Face folders in and out: import as checkpoint.init_from, train, export, reload.

Real transformers models of the real small shapes, saved with save_pretrained (safetensors), real
trainer processes (CPU, fp32), and the exported folder loaded back with from_pretrained.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import BertForMaskedLM, EsmForMaskedLM

from bionemo import hf, rundir
from bionemo.checkpoint import load_weights
from bionemo.config import ModelConfig
from bionemo.export import FINAL_MODEL
from bionemo.models import build_model
from bionemo.models.esm2.convert import to_hf_config
from bionemo.models.geneformer.convert import to_hf_config as bert_config

REPO = Path(__file__).resolve().parents[1]
ESM2_8M = ModelConfig(
    name="esm2_8m",
    num_layers=6,
    hidden_size=320,
    num_attention_heads=20,
    ffn_hidden_size=1280,
    seq_length=64,
)
# Geneformer 10M's shape (and the sample set's vocabulary, the real one's size), at 128 positions
# so that a CPU step is quick.
GENEFORMER_10M = ModelConfig(
    name="geneformer_10m",
    family="geneformer",
    num_layers=6,
    hidden_size=256,
    num_attention_heads=4,
    ffn_hidden_size=512,
    seq_length=128,
    vocab_size=25426,
    layer_norm_eps=1e-12,
    token_dropout=False,
    activation="relu",
)


def hf_folder(tmp_path: Path, cfg: ModelConfig, *, position_table: bool = False) -> Path:
    torch.manual_seed(0)
    model = (
        EsmForMaskedLM(to_hf_config(cfg))
        if cfg.family == "esm2"
        else BertForMaskedLM(bert_config(cfg))
    )
    out = tmp_path / f"hf-{cfg.name}"
    model.save_pretrained(out, safe_serialization=True)
    if position_table:
        # What transformers 4.40-4.51 (and most facebook/esm2_* files) carry: an absolute-position
        # table that rotary ESM-2 never reads.
        sd = load_file(str(out / hf.WEIGHTS))
        sd[hf.ESM_POSITION_TABLE] = torch.randn(cfg.seq_length + 2, cfg.hidden_size)
        save_file(sd, str(out / hf.WEIGHTS), metadata={"format": "pt"})
    return out


def logits_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item()), (
        f"max abs diff {(a - b).abs().max().item()}"
    )


def batch(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 24 if cfg.family == "esm2" else cfg.vocab_size, (2, 40), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 30:] = False
    return ids, mask


def ours_logits(model, ids, mask):
    with torch.no_grad():
        return model.logits(model(ids, mask))


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask.long()).logits


def loaded_cleanly(cls, folder: Path):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("cfg", [ESM2_8M, GENEFORMER_10M], ids=["esm2_8m", "geneformer_10m"])
def test_import_then_export_is_the_same_function(tmp_path, cfg):
    folder = hf_folder(tmp_path, cfg, position_table=cfg.family == "esm2")
    ref = (
        (EsmForMaskedLM if cfg.family == "esm2" else BertForMaskedLM).from_pretrained(folder).eval()
    )
    ours = build_model(cfg).eval()
    hf.load_into(folder, ours)
    ids, mask = batch(cfg)
    logits_close(ours_logits(ours, ids, mask)[mask], hf_logits(ref, ids, mask)[mask])
    out = hf.export(ours, tmp_path / "export")
    back = loaded_cleanly(EsmForMaskedLM if cfg.family == "esm2" else BertForMaskedLM, out)
    logits_close(hf_logits(back, ids, mask)[mask], hf_logits(ref, ids, mask)[mask])


def run_trainer(tmp_path: Path, trainer_cfg: dict) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CONFIG).write_text(yaml.safe_dump({"trainer": trainer_cfg}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(
        [sys.executable, "-m", "bionemo.train", str(run)],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run / "trainer.log").write_text(out.stdout + out.stderr)
    return run


def common(cfg: ModelConfig, init_from: Path) -> dict:
    return {
        "model": cfg.model_dump(mode="json"),
        "optim": {"warmup_steps": 1, "lr": 1e-3},
        "train": {
            "micro_batch_size": 2,
            "max_steps": 3,
            "log_every": 1,
            "limit_val_batches": 0,
            "precision": "fp32",
            "device": "cpu",
        },
        "checkpoint": {"every_steps": 3, "init_from": str(init_from)},
    }


@pytest.mark.parametrize("family", ["esm2", "geneformer"])
def test_init_from_hf_train_export_reload(tmp_path, family):
    if family == "esm2":
        cfg, cls = ESM2_8M, EsmForMaskedLM
        trainer_cfg = common(cfg, hf_folder(tmp_path, cfg, position_table=True))
    else:
        cfg, cls = GENEFORMER_10M, BertForMaskedLM
        trainer_cfg = common(cfg, hf_folder(tmp_path, cfg))
        sample = REPO / "data" / "geneformer_sample"
        trainer_cfg["data"] = {
            "format": "scdl",
            "train": str(sample / "train"),
            "valid": str(sample / "valid"),
            "vocab": str(sample / "vocab.json"),
            "gene_medians": str(sample / "gene_medians.json"),
        }
    run = run_trainer(tmp_path, trainer_cfg)
    log = (run / "trainer.log").read_text()
    assert "initialised weights from" in log
    if family == "esm2":
        assert f"dropping {hf.ESM_POSITION_TABLE}" in log
    # The step-3 checkpoint and final_model/ hold the same trained weights.
    ours = build_model(cfg).eval()
    load_weights(rundir.step_dir(run, 3), ours)
    start = build_model(cfg).eval()
    hf.load_into(Path(trainer_cfg["checkpoint"]["init_from"]), start)
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), start.parameters())), (
        "training changed nothing"
    )
    final = loaded_cleanly(cls, run / FINAL_MODEL)
    ids, mask = batch(cfg)
    logits_close(hf_logits(final, ids, mask)[mask], ours_logits(ours, ids, mask)[mask])
    if family == "esm2":
        from transformers import EsmTokenizer

        tok = EsmTokenizer.from_pretrained(run / FINAL_MODEL)
        assert tok("MKV")["input_ids"] == [0, 20, 15, 7, 2]
    # On demand, from the run directory: the same files.
    again = tmp_path / "again"
    out = subprocess.run(
        [sys.executable, "-m", "bionemo.export", str(run), str(again)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (
        load_file(str(again / hf.WEIGHTS)).keys()
        == load_file(str(run / FINAL_MODEL / hf.WEIGHTS)).keys()
    )
    assert json.loads((again / hf.CONFIG).read_text()) == json.loads(
        (run / FINAL_MODEL / hf.CONFIG).read_text()
    )


def test_export_refuses_what_is_not_a_run(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bionemo.export", str(tmp_path), str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "neither a run directory" in out.stderr


def _submit(tmp_path: Path, init_from: Path, model: str = "esm2_8m") -> subprocess.CompletedProcess:
    runs = tmp_path / "runs"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers",
            "submit",
            "--model",
            model,
            f"trainer.checkpoint.init_from={init_from}",
            f"cluster.runs_root={runs}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert not runs.exists() or not any(runs.rglob("config.yaml")), "a run directory was written"
    return out


def _bad(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    d = tmp_path / name
    d.mkdir()
    for f, data in files.items():
        (d / f).write_bytes(data)
    return d


@pytest.mark.parametrize(
    "case,expect",
    [
        ("pickle_only", "pytorch_model.bin (a pickle"),
        ("config_only", "has config.json but no model.safetensors"),
        ("weights_only", "has weights but no config.json"),
        ("empty", "neither a complete checkpoint folder"),
        ("shape", "has another shape: num_layers 6 (configured: 33)"),
        ("family", "model_type 'bert', not 'esm'"),
    ],
)
def test_bad_hf_folders_are_refused_before_submit(tmp_path, case, expect):
    if case == "shape":
        folder, model = hf_folder(tmp_path, ESM2_8M), "esm2_650m"
    elif case == "family":
        folder, model = hf_folder(tmp_path, GENEFORMER_10M), "esm2_8m"
    else:
        config = json.dumps({"model_type": "esm"}).encode()
        files = {
            "pickle_only": {"config.json": config, "pytorch_model.bin": b"x"},
            "config_only": {"config.json": config},
            "weights_only": {"model.safetensors": b"x"},
            "empty": {},
        }[case]
        folder, model = _bad(tmp_path, case, files), "esm2_8m"
    out = _submit(tmp_path, folder, model)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "trainer.checkpoint.init_from" in lines[0] and expect in lines[0], lines[0]
