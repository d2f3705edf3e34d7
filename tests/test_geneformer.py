"""Geneformer: HF BertForMaskedLM parity, rank-value tokenization, h5ad -> SCDL -> batch, presets,
and an exact resume of the real trainer with dropout on (2 ranks, gloo, SIGUSR2)."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from bionemo import rundir
from bionemo.config import REQUEUE_EXIT_CODE, CellDataConfig, ModelConfig, TrainerConfig
from bionemo.data import cells_sample
from bionemo.data.cells import build_dataloader, check_vocab_size, collate_cells, open_cells
from bionemo.data.cells_tokenizer import (
    GeneVocab,
    column_lookup,
    load_gene_medians,
    mask_genes,
    rank_value_encode,
)
from bionemo.data.masking import IGNORE_INDEX
from bionemo.models import build_model
from bionemo.models.geneformer import Geneformer, convert
from tests.test_resume import assert_bitwise_equal, launch, wait_all

import transformers  # noqa: E402  (test extra: a missing install fails, never skips)
import anndata  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    name="geneformer_tiny",
    family="geneformer",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    ffn_hidden_size=128,
    seq_length=64,
    vocab_size=305,
    layer_norm_eps=1e-12,
    token_dropout=False,
    activation="relu",
    hidden_dropout=0.02,
    attention_dropout=0.1,
)
SPECIALS = ["<cls>", "<mask>", "<pad>", "<sep>", "<unk>"]
CLS, MASK, PAD = 0, 1, 2


def tiny_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**(TINY | overrides))


# ------------------------------------------------------------------------------------- model


def random_hf_model(cfg: ModelConfig, seed: int = 0):
    """A seeded HF BertForMaskedLM with every parameter random (LayerNorms and biases too)."""
    torch.manual_seed(seed)
    hf_cfg = convert.to_hf_config(cfg)
    hf_cfg._attn_implementation = "eager"  # the plain reference, independent of our SDPA path
    hf = transformers.BertForMaskedLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "LayerNorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.copy_(0.2 * torch.randn_like(p))  # 10x the init std: peaked attention
            else:
                p.copy_(0.05 * torch.randn_like(p))
    assert hf.cls.predictions.decoder.weight is hf.bert.embeddings.word_embeddings.weight
    return hf


def padded_batch(seed=0, lengths=(64, 40, 17, 3), vocab=305):
    g = torch.Generator().manual_seed(seed)
    B, S = len(lengths), max(lengths)
    ids = torch.full((B, S), PAD)
    mask = torch.zeros(B, S, dtype=torch.bool)
    labels = torch.full((B, S), IGNORE_INDEX)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(5, vocab, (n,), generator=g)
        ids[b, 0] = CLS
        mask[b, :n] = True
        picked = torch.rand(n, generator=g) < 0.3
        picked[0], picked[-1] = False, True
        labels[b, :n][picked] = ids[b, :n][picked]
        ids[b, :n][picked & (torch.rand(n, generator=g) < 0.8)] = MASK
    return ids, mask, labels


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_logits_match_hf_bert_with_padding(activation):
    cfg = tiny_cfg(activation=activation)
    hf = random_hf_model(cfg)
    ours = convert.from_hf(hf).eval()
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).logits
        got = ours.logits(ours(ids, mask))
    # Every position, padding included (BERT computes padded queries too).
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_conversion_round_trip_and_parameter_count():
    cfg = tiny_cfg()
    hf = random_hf_model(cfg, seed=1)
    ours = convert.from_hf(hf)
    back = convert.to_hf(ours).state_dict()
    for k, v in hf.state_dict().items():
        assert torch.equal(back[k], v), k
    n_hf = sum(p.numel() for p in hf.parameters())  # tied decoder weight and bias counted once
    assert cfg.num_parameters == n_hf == sum(p.numel() for p in ours.parameters())


def test_loss_runs_the_head_on_masked_positions_only():
    torch.manual_seed(0)
    model = Geneformer(tiny_cfg()).eval()
    ids, mask, labels = padded_batch(seed=3)
    with torch.no_grad():
        full = model.logits(model(ids, mask))  # [B, S, V]
        ref = F.cross_entropy(full.reshape(-1, full.shape[-1]), labels.reshape(-1))
        got = model.loss(ids, mask, labels)
        none = model.loss(ids, mask, torch.full_like(labels, IGNORE_INDEX))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert none.item() == 0.0


def test_packed_rows_equal_padded_batch():
    torch.manual_seed(0)
    model = Geneformer(tiny_cfg()).eval()
    rng = np.random.default_rng(0)
    samples = []
    for n in (20, 64, 7, 33):
        tokens = np.concatenate(([CLS], rng.integers(5, 305, n - 1)))
        ids, labels = mask_genes(
            tokens,
            rng,
            GeneVocab(vocab_tokens(300)),
            mask_prob=0.3,
            mask_token_prob=0.8,
            random_token_prob=0.1,
        )
        samples.append({"input_ids": ids, "labels": labels})
    padded = collate_cells(samples, PAD, "longest", 64)
    packed = collate_cells(samples, PAD, "none", 64)  # tail of 128 - 124 <pad>s
    with torch.no_grad():
        hp = model(padded["input_ids"], padded["attention_mask"])
        hk = model(
            packed["input_ids"],
            packed["attention_mask"],
            packed["cu_seqlens"],
            packed["max_seqlen"],
        )
        real = hp[padded["attention_mask"]]
        torch.testing.assert_close(hk[0, : len(real)], real, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.loss(**packed), model.loss(**padded), rtol=1e-5, atol=1e-6)


def test_dropout_trains_and_recompute_replays_the_same_masks():
    ids, mask, labels = padded_batch(seed=4)
    results = []
    for recompute in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = Geneformer(
            tiny_cfg(hidden_dropout=0.2, attention_dropout=0.2, activation_checkpointing=recompute)
        )
        torch.manual_seed(1)
        loss = model.loss(ids, mask, labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    model.eval()
    with torch.no_grad():  # eval: no dropout, so two calls agree; train mode would not
        assert torch.equal(model.loss(ids, mask, labels), model.loss(ids, mask, labels))


def test_build_model_and_token_dropout_rejected():
    assert isinstance(build_model(tiny_cfg()), Geneformer)
    with pytest.raises(ValueError, match="token_dropout"):
        build_model(tiny_cfg(token_dropout=True))


# --------------------------------------------------------------------------------- tokenizer


def vocab_tokens(n_genes: int) -> dict[str, int]:
    return {t: i for i, t in enumerate([*SPECIALS, *(f"G{i}" for i in range(n_genes))])}


def test_rank_value_encoding_by_hand():
    vocab = GeneVocab({**{t: i for i, t in enumerate(SPECIALS)}, "A": 5, "B": 6, "C": 7, "D": 8})
    medians = {"A": 2.0, "B": 0.5, "C": 1.0, "D": 4.0}
    # Columns of the data set; E is not in the vocabulary, F is an explicitly stored zero.
    features = ["A", "B", "C", "D", "E", "F"]
    col_token, col_median = column_lookup(features, vocab, medians)
    assert col_token.tolist() == [5, 6, 7, 8, -1, -1]
    counts = np.array([4, 3, 3, 8, 10, 0], dtype=np.float32)  # total 28
    # x = count / 28 * 1e4 / median:  A 4/2 = 2,  B 3/0.5 = 6,  C 3/1 = 3,  D 8/4 = 2 (x 1e4/28)
    # E (count 10, the largest) is dropped as unknown; A and D tie and keep column order.
    kw = dict(cls_id=CLS, normalize_total=1e4)
    tokens = rank_value_encode(counts, np.arange(6), col_token, col_median, seq_length=10, **kw)
    assert tokens.tolist() == [CLS, 6, 7, 5, 8]  # <cls> B C A D
    short = rank_value_encode(counts, np.arange(6), col_token, col_median, seq_length=3, **kw)
    assert short.tolist() == [CLS, 6, 7]  # cut after <cls> + 2 genes
    # A sparse row lists only some columns: the same cell without C and E.
    sub = rank_value_encode(
        counts[[0, 1, 3]], np.array([0, 1, 3]), col_token, col_median, seq_length=10, **kw
    )
    assert sub.tolist() == [CLS, 6, 5, 8]
    empty = rank_value_encode(
        np.array([5.0]), np.array([4]), col_token, col_median, seq_length=10, **kw
    )
    assert empty.tolist() == [CLS]


def test_masking_rates_and_pool():
    vocab = GeneVocab(vocab_tokens(1000))
    tokens = np.concatenate(([CLS], np.arange(5, 1005).repeat(40)))  # 40k genes
    rng = np.random.default_rng(0)
    ids, labels = mask_genes(
        tokens, rng, vocab, mask_prob=0.15, mask_token_prob=0.8, random_token_prob=0.1
    )
    selected = labels != IGNORE_INDEX
    assert labels[0] == IGNORE_INDEX and ids[0] == CLS  # <cls> is never selected
    assert abs(selected.mean() - 0.15) < 0.01
    assert (labels[selected] == tokens[selected]).all()
    masked = ids[selected] == MASK
    changed = (ids[selected] != tokens[selected]) & ~masked
    assert abs(masked.mean() - 0.8) < 0.02 and abs(changed.mean() - 0.1) < 0.015
    assert (ids[selected][~masked] >= 5).all()  # random replacements are genes, never specials
    assert (ids[~selected] == tokens[~selected]).all()


def test_vocab_file_errors(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"<pad>": 0, "<mask>": 1, "ENSG1": 2}))  # no <cls>
    with pytest.raises(ValueError, match="cls"):
        GeneVocab.load(path)
    path.write_text(json.dumps(vocab_tokens(3)))
    vocab = GeneVocab.load(path)
    assert (vocab.cls_id, vocab.mask_id, vocab.pad_id, len(vocab)) == (0, 1, 2, 8)
    with pytest.raises(ValueError, match=r"model\.vocab_size is 25426 .* set model\.vocab_size=8"):
        check_vocab_size(vocab, 25426)
    medians = tmp_path / "medians.json"
    medians.write_text(json.dumps({"G0": 1.0, "G1": 2.0}))
    with pytest.raises(ValueError, match="G2"):
        load_gene_medians(medians, vocab)
    # BioNeMo's bracket spelling and a recipe-style vocab.txt load the same way.
    txt = tmp_path / "vocab.txt"
    txt.write_text("\n".join(["[CLS]", "[MASK]", "[PAD]", "[SEP]", "[UKW]", "ENSG1"]) + "\n")
    assert GeneVocab.load(txt).special == {"cls": 0, "mask": 1, "pad": 2, "sep": 3, "unk": 4}


@pytest.mark.parametrize(
    "vocab, overrides, expect",
    [
        (  # the sample's 300 genes + 5 specials against the preset's 25,426 rows
            None,
            [],
            "trainer.model.vocab_size: 25426, but {vocab} has 305 tokens; set "
            "trainer.model.vocab_size=305",
        ),
        ('{"<cls>": 0, ', ["trainer.model.vocab_size=305"], "{vocab} is not valid JSON"),
    ],
)
def test_submit_refuses_a_vocabulary_the_embedding_does_not_fit(
    sample, tmp_path, vocab, overrides, expect
):
    """One embedding row per token: a mismatch is refused at submit (exit 2, one line, no run
    directory), not by the trainer once the job runs."""
    from tests.test_cli import refused

    path = sample / "vocab.json"
    if vocab is not None:
        path = tmp_path / "vocab.json"
        path.write_text(vocab)
    runs = tmp_path / "runs"
    line = refused(
        "submit",
        "--model",
        "geneformer_10m",
        f"cluster.runs_root={runs}",
        f"trainer.data.train={sample / 'train'}",
        f"trainer.data.valid={sample / 'valid'}",
        f"trainer.data.vocab={path}",
        f"trainer.data.gene_medians={sample / 'gene_medians.json'}",
        *overrides,
    )
    assert expect.format(vocab=path) in line, line
    assert not runs.exists()


# ------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cells")
    cells_sample.build(out, n_cells=64, n_valid=16, n_genes=300, seed=3, median_genes=80)
    return out


def data_cfg(sample: Path, **kw) -> CellDataConfig:
    return CellDataConfig(
        train=sample / "train",
        valid=sample / "valid",
        vocab=sample / "vocab.json",
        gene_medians=sample / "gene_medians.json",
        **kw,
    )


def test_h5ad_to_scdl_to_batch_round_trip(sample):
    import anndata as ad

    cfg = data_cfg(sample)
    vocab = GeneVocab.load(cfg.vocab)
    medians = load_gene_medians(cfg.gene_medians, vocab)
    adata = ad.read_h5ad(sample / "h5ad" / "valid.h5ad")
    x = adata.X.tocsr()
    col_token, col_median = column_lookup(adata.var["feature_id"], vocab, medians)
    seq = 64
    expected = []
    for i in range(x.shape[0]):
        row = slice(x.indptr[i], x.indptr[i + 1])
        expected.append(
            rank_value_encode(
                x.data[row],
                x.indices[row],
                col_token,
                col_median,
                cls_id=vocab.cls_id,
                seq_length=seq,
                normalize_total=cfg.normalize_total,
            )
        )
    cells = open_cells(cfg, seq, "valid")
    assert len(cells) == x.shape[0] == 16
    for i in range(len(cells)):
        assert cells.tokens(i).tolist() == expected[i].tolist()
    assert max(len(e) for e in expected) == seq  # some cells were cut to seq_length

    # Validation reads cells in order (g -> cell g), so batch row r is cell r.
    loader = build_dataloader(
        cfg,
        seq,
        micro_batch_size=4,
        dp_rank=0,
        dp_size=1,
        grad_accumulation=1,
        start_sample=0,
        split="valid",
        vocab_size=len(vocab),
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, seq) and batch["input_ids"].dtype == torch.int64
    for r in range(4):
        n, want = len(expected[r]), torch.from_numpy(expected[r])
        ids, labels, real = batch["input_ids"][r], batch["labels"][r], batch["attention_mask"][r]
        assert real[:n].all() and not real[n:].any()
        assert (ids[n:] == vocab.pad_id).all() and (labels[n:] == IGNORE_INDEX).all()
        scored = labels[:n] != IGNORE_INDEX
        assert scored.any() and (labels[:n][scored] == want[scored]).all()
        kept = ~scored
        assert (ids[:n][kept] == want[kept]).all()


def test_loader_is_a_pure_function_of_the_sample_index(sample):
    cfg = data_cfg(sample)
    args = dict(seq_length=64, micro_batch_size=2, grad_accumulation=1)
    one = iter(build_dataloader(cfg, dp_rank=0, dp_size=1, start_sample=0, **args))
    stream = [next(one) for _ in range(4)]  # samples 0..7
    # Rank 1 of 2 resuming at sample 4 reads samples 6, 7 first.
    two = next(iter(build_dataloader(cfg, dp_rank=1, dp_size=2, start_sample=4, **args)))
    for k in ("input_ids", "labels"):
        assert torch.equal(two[k], stream[3][k])
    before = torch.get_rng_state()
    iter(build_dataloader(cfg, dp_rank=0, dp_size=1, start_sample=0, **args))
    assert torch.equal(torch.get_rng_state(), before)  # dropout's RNG is left alone


def test_parquet_of_pretokenized_cells(sample, tmp_path):
    cfg = data_cfg(sample)
    cells = open_cells(cfg, 64, "train")
    rows = [cells.tokens(i)[1:].tolist() for i in range(10)]  # as the recipe stores them: no <cls>
    path = tmp_path / "cells.parquet"
    pq.write_table(
        pa.table({"input_ids": rows, "length": [len(r) for r in rows]}), path, row_group_size=4
    )
    pcfg = data_cfg(sample, format="parquet").model_copy(update={"train": path, "valid": None})
    pcells = open_cells(pcfg, 64, "train")
    assert len(pcells) == 10
    for i in (0, 5, 9, 4):  # across row groups
        assert pcells.tokens(i).tolist() == cells.tokens(i).tolist()
    assert len(open_cells(pcfg, 8, "train").tokens(0)) == 8  # cut to seq_length
    pq.write_table(pa.table({"input_ids": [[5, 6, 999]]}), path)
    with pytest.raises(ValueError, match="outside data.vocab"):
        open_cells(pcfg, 64, "train").tokens(0)


def test_sample_builder_is_deterministic(sample, tmp_path):
    again = tmp_path / "again"
    cells_sample.build(again, n_cells=64, n_valid=16, n_genes=300, seed=3, median_genes=80)
    for name in ("vocab.json", "gene_medians.json"):
        assert (again / name).read_bytes() == (sample / name).read_bytes()
    for split in ("train", "valid"):
        for arr in ("data.npy", "col_ptr.npy", "row_ptr.npy"):
            assert (again / split / arr).read_bytes() == (sample / split / arr).read_bytes()


def test_presets_validate_and_fit_the_sample_vocabulary():
    sizes = {}
    for name in ("geneformer_10m", "geneformer_106m", "geneformer_4b"):
        raw = yaml.safe_load((REPO / "configs" / "models" / f"{name}.yaml").read_text())
        cfg = TrainerConfig.model_validate(raw["trainer"])
        assert isinstance(cfg.data, CellDataConfig) and cfg.model.family == "geneformer"
        assert cfg.model.activation == "relu" and cfg.model.layer_norm_eps == 1e-12
        assert cfg.model.seq_length == 2048 and not cfg.model.token_dropout
        assert cfg.model.vocab_size == cells_sample.NUM_GENES + len(cells_sample.SAMPLE_SPECIALS)
        sizes[name] = cfg.model.num_parameters
    assert round(sizes["geneformer_10m"] / 1e6) == 10
    assert round(sizes["geneformer_106m"] / 1e6) == 107  # BioNeMo's "106M"


# ------------------------------------------------------------------- exact resume (trainer)

MAX_STEPS = 12


def make_run(path: Path, sample: Path) -> Path:
    cfg = {
        "trainer": {
            "model": TINY
            | {
                "hidden_size": 32,
                "num_attention_heads": 2,
                "ffn_hidden_size": 64,
                "hidden_dropout": 0.1,
                "attention_dropout": 0.1,
            },
            "data": {
                k: str(v)
                for k, v in data_cfg(sample)
                .model_dump(include={"train", "valid", "vocab", "gene_medians"})
                .items()
            },
            "optim": {"warmup_steps": 3, "lr": 1e-3},
            "train": {
                "micro_batch_size": 4,
                "max_steps": MAX_STEPS,
                "log_every": 1,
                "val_every": 6,
                "precision": "fp32",
                "device": "cpu",
            },
            "checkpoint": {"every_steps": 3, "keep_last": 2},
        }
    }
    path.mkdir(parents=True)
    (path / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / rundir.METRICS).read_text().splitlines() if x]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def final_state(run_dir: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{run_dir.name}.pt"
    dcp_to_torch_save(rundir.step_dir(run_dir, MAX_STEPS), out)
    return torch.load(out, weights_only=False)


def test_signal_stop_and_restart_is_bitwise_exact_with_dropout(tmp_path, sample):
    ref = make_run(tmp_path / "uninterrupted", sample)
    run = make_run(tmp_path / "stopped", sample)
    stop_at = random.Random(time.time_ns()).randint(2, MAX_STEPS - 5)
    print(f"stopping after step {stop_at}")
    # The reference runs alongside the stopped run: 4 processes on 2 cores, one thread each.
    ref_procs = launch(ref, world=2)
    procs = launch(run, world=2, BIONEMO_STEP_SLEEP="0.25")
    deadline = time.time() + 180
    while time.time() < deadline:
        if (run / rundir.METRICS).exists() and max(train_losses(run), default=0) >= stop_at:
            break
        assert all(p.poll() is None for p in procs), "training ended before the signal"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR2)  # one rank only: the ranks agree among themselves
    assert wait_all(procs) == [REQUEUE_EXIT_CODE] * 2
    assert stop_at <= rundir.latest_complete_step(run) < MAX_STEPS
    assert wait_all(launch(run, world=2)) == [0, 0]  # new processes resume from the checkpoint
    assert wait_all(ref_procs) == [0, 0]

    assert sorted(train_losses(run)) == list(range(1, MAX_STEPS + 1))
    assert train_losses(run) == train_losses(ref)
    assert_bitwise_equal(final_state(run, tmp_path), final_state(ref, tmp_path))
