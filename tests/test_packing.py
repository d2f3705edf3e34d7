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
    cfg = ModelConfig(
        name="t",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        seq_length=64,
    )
    model = ESM2(cfg)
    batch = samples([20, 64, 7, 33, 50])
    padded, packed = collate(batch, "longest", 64), collate(batch, "none", 64)
    hp = model(padded["input_ids"], padded["attention_mask"])
    hk = model(
        packed["input_ids"], packed["attention_mask"], packed["cu_seqlens"], packed["max_seqlen"]
    )
    real = hp[padded["attention_mask"]]
    torch.testing.assert_close(hk[0, : len(real)], real, rtol=1e-5, atol=1e-5)

    lp = model.loss(**padded)
    lk = model.loss(**packed)
    torch.testing.assert_close(lk, lp, rtol=1e-5, atol=1e-6)
    gp = torch.autograd.grad(lp, list(model.parameters()))
    gk = torch.autograd.grad(lk, list(model.parameters()))
    for a, b in zip(gp, gk):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _segment_attention(q, k, v, cu_q, cu_k):
    """Reference for variable-length attention with separate query/key segments: segment i's
    queries cu_q[i]:cu_q[i+1] attend to keys cu_k[i]:cu_k[i+1]; no keys gives a zero output."""
    out = torch.zeros_like(q)
    for a, b, c, d in zip(
        cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()
    ):
        if b > a and d > c:
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)
            ).transpose(0, 1)
    return out


def test_padded_segments_skip_padding_and_match_masked_attention():
    from bionemo.models.esm2.model import padded_segments

    lengths = [64, 40, 1, 17]  # a full row: its padding segments are empty
    B, S, H, D = len(lengths), 64, 2, 8
    mask = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    cu_q, cu_k = padded_segments(mask)
    assert cu_q.dtype == cu_k.dtype == torch.int32 and len(cu_q) == len(cu_k) == 3 * B + 1
    assert cu_q[-1] == cu_k[-1] == B * S
    q_len, k_len = cu_q.diff(), cu_k.diff()
    assert (q_len[0::3] == k_len[0::3]).all() and q_len[0::3].tolist() == lengths
    assert (q_len[1::3] == 0).all() and (k_len[2::3] == 0).all()  # padding: keys xor queries

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B * S, H, D, generator=g) for _ in range(3))
    got = _segment_attention(q, k, v, cu_q, cu_k)
    ref = (
        torch.nn.functional.scaled_dot_product_attention(
            *(t.unflatten(0, (B, S)).transpose(1, 2) for t in (q, k, v)),
            attn_mask=mask[:, None, None, :],
        )
        .transpose(1, 2)
        .flatten(0, 1)
    )
    real = mask.flatten()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-6)
    assert (got[~real] == 0).all()
