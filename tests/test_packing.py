"""Packed rows (data.pad_to=none) compute the same function as padded batches."""

from __future__ import annotations

import numpy as np
import torch

from bionemo.config import ModelConfig
from bionemo.data.dataset import PACK_MULTIPLE, collate
from bionemo.data.tokenizer import CLS_ID, EOS_ID, MASK_ID
from bionemo.models.esm2.model import ESM2


def samples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(4, 24, n)
        ids[0], ids[-1] = CLS_ID, EOS_ID
        ids[1:-1][rng.random(n - 2) < 0.15] = MASK_ID
        labels = np.where(rng.random(n) < 0.2, rng.integers(4, 24, n), -100)
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_pack_layout():
    batch = collate(samples([20, 64, 7]), "none", 64)
    assert batch["input_ids"].shape == (1, PACK_MULTIPLE)
    assert batch["cu_seqlens"].tolist() == [0, 20, 84, 91, PACK_MULTIPLE]
    assert batch["max_seqlen"] == 64 and int(batch["attention_mask"].sum()) == 91
    assert (batch["labels"][0, 91:] == -100).all()


def test_packed_equals_padded():
    torch.manual_seed(0)
    cfg = ModelConfig(name="t", num_layers=2, hidden_size=64, num_attention_heads=4,
                      ffn_hidden_size=128, seq_length=64)
    model = ESM2(cfg)
    batch = samples([20, 64, 7, 33, 50])
    padded, packed = collate(batch, "longest", 64), collate(batch, "none", 64)
    hp = model(padded["input_ids"], padded["attention_mask"])
    hk = model(packed["input_ids"], packed["attention_mask"], packed["cu_seqlens"], packed["max_seqlen"])
    real = hp[padded["attention_mask"]]
    torch.testing.assert_close(hk[0, : len(real)], real, rtol=1e-5, atol=1e-5)

    lp = model.loss(**padded)
    lk = model.loss(**packed)
    torch.testing.assert_close(lk, lp, rtol=1e-5, atol=1e-6)
    gp = torch.autograd.grad(lp, list(model.parameters()))
    gk = torch.autograd.grad(lk, list(model.parameters()))
    for a, b in zip(gp, gk):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
