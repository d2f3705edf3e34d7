"""bionemo.data: tokenizer, masking statistics, deterministic dataset, sampler, prep, bad input."""

from __future__ import annotations

import sqlite3

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bionemo.config import DataConfig
from bionemo.data.dataset import (
    GlobalBatchSampler,
    MLMDataset,
    ProteinClusters,
    build_dataloader,
    collate,
)
from bionemo.data.masking import IGNORE_INDEX, mask_tokens
from bionemo.data.prep import prepare, read_fasta
from bionemo.data.sample import generate
from bionemo.data.tokenizer import (
    AMINO_ACID_IDS, CLS_ID, EOS_ID, MASK_ID, PAD_ID, TOKENS, UNK_ID, VOCAB_SIZE, decode, encode,
)  # fmt: skip

MASKING = dict(mask_prob=0.15, mask_token_prob=0.8, random_token_prob=0.1)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    fasta, tsv = generate(out, n_clusters=120, seed=1)
    prepare(fasta, out, tsv, valid_fraction=0.1, seed=1)
    return out


def data_cfg(d, **kw) -> DataConfig:
    return DataConfig(
        train_clusters=d / "train_clusters.parquet",
        valid_clusters=d / "valid_clusters.parquet",
        database=d / "proteins.sqlite",
        **kw,
    )


def train_set(d, seq_length=128, seed=7) -> MLMDataset:
    clusters = ProteinClusters(d / "train_clusters.parquet", d / "proteins.sqlite", "ur90_id")
    return MLMDataset(clusters, seq_length, data_cfg(d), seed=seed)


def unmasked(item) -> str:
    """The residues an item was built from: labels where selected, input ids elsewhere."""
    ids = np.where(item["labels"] != IGNORE_INDEX, item["labels"], item["input_ids"])
    assert ids[0] == CLS_ID and ids[-1] == EOS_ID
    return decode(ids[1:-1])


# ---------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_esm_order_and_round_trip():
    assert VOCAB_SIZE == 33 and TOKENS[:5] == ("<cls>", "<pad>", "<eos>", "<unk>", "L")
    assert (CLS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID) == (0, 1, 2, 3, 32)
    assert "".join(TOKENS[i] for i in AMINO_ACID_IDS) == "LAGVSERTIDPKQNFYMHWC"
    ids = encode("MKTAYIAKQRX-.")
    assert ids.dtype == np.int64 and decode(ids) == "MKTAYIAKQRX-."
    assert encode("a*é").tolist() == [UNK_ID] * 3  # lowercase, '*', non-ASCII: unknown


# ------------------------------------------------------------------------------------------ masking


def masked_batch(pool, n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 29, n)  # residues, X B U Z O included
    specials = rng.random(n) < 0.05
    tokens[specials] = rng.choice([CLS_ID, EOS_ID, PAD_ID], int(specials.sum()))
    input_ids, labels = mask_tokens(tokens, rng, random_token_pool=pool, **MASKING)
    return tokens, specials, input_ids, labels


def within_3_sigma(count, n, p):
    return abs(count - n * p) <= 3 * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("pool,pool_size", [("all_tokens", 33), ("amino_acids_only", 20)])
def test_masking_statistics(pool, pool_size):
    tokens, specials, input_ids, labels = masked_batch(pool)
    selected = labels != IGNORE_INDEX
    assert not selected[specials].any() and (input_ids[specials] == tokens[specials]).all()
    assert (labels[selected] == tokens[selected]).all()
    assert (input_ids[~selected] == tokens[~selected]).all()
    assert within_3_sigma(selected.sum(), (~specials).sum(), 0.15)

    n = int(selected.sum())
    inp, orig = input_ids[selected], tokens[selected]
    # A random token can land on <mask> (all_tokens only) or on the original (if in the pool).
    p_hits_mask = 1 / pool_size if pool == "all_tokens" else 0.0
    p_same = np.mean(
        [
            1 / pool_size if t in (range(33) if pool == "all_tokens" else AMINO_ACID_IDS) else 0
            for t in orig
        ]
    )
    assert within_3_sigma((inp == MASK_ID).sum(), n, 0.8 + 0.1 * p_hits_mask)
    assert within_3_sigma((inp == orig).sum(), n, 0.1 + 0.1 * p_same)
    changed = inp[(inp != orig) & (inp != MASK_ID)]
    assert within_3_sigma(len(changed), n, 0.1 * (1 - p_same - p_hits_mask))
    if pool == "amino_acids_only":
        assert set(changed.tolist()) <= set(AMINO_ACID_IDS)
    else:  # the whole vocabulary, specials included, as BioNeMo's default does
        assert set(changed.tolist()) == set(range(33)) - {MASK_ID}


# ------------------------------------------------------------------------------------------ dataset


def test_same_seed_and_index_give_the_same_item(sample_dir):
    a, b = train_set(sample_dir), train_set(sample_dir)
    n = len(a)
    for g in [0, 1, n - 1, n, 5 * n + 3]:
        x, y = a[g], b[g]
        assert x["input_ids"].dtype == np.int64 and x["labels"].dtype == np.int64
        assert np.array_equal(x["input_ids"], y["input_ids"]) and np.array_equal(
            x["labels"], y["labels"]
        )
    other_seed = train_set(sample_dir, seed=8)
    assert any(not np.array_equal(a[g]["input_ids"], other_seed[g]["input_ids"]) for g in range(5))


def test_epochs_reshuffle_and_resample_members(sample_dir):
    ds = train_set(sample_dir, seq_length=4096)  # no cropping: an item holds a whole member
    n = len(ds)
    orders = [ds.order(e).copy() for e in range(3)]
    assert all(sorted(o.tolist()) == list(range(n)) for o in orders)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])

    big = [c for c in range(n) if ds.clusters.num_members(c) >= 4][:3]
    assert big, "the sample set should have multi-member clusters"
    for c in big:
        members = {ds.clusters.sequence(m): m for m in ds.clusters[c]}
        chosen = set()
        for epoch in range(12):
            g = epoch * n + int(np.flatnonzero(ds.order(epoch) == c)[0])
            chosen.add(members[unmasked(ds[g])])  # KeyError if the item is not a whole member
        assert len(chosen) > 1, f"cluster {c} got the same member in 12 epochs"


def test_crop(sample_dir):
    seq_length = 128
    ds = train_set(sample_dir, seq_length=seq_length)
    n, cropped, whole = len(ds), 0, 0
    for g in range(n):  # one epoch
        item = ds[g]
        assert len(item["input_ids"]) <= seq_length and len(item["labels"]) == len(
            item["input_ids"]
        )
        assert (
            item["input_ids"][0] == CLS_ID and item["input_ids"][-1] == EOS_ID
        )  # <eos> always wraps the window
        text = unmasked(item)
        cluster = int(ds.order(0)[g])
        sequences = [ds.clusters.sequence(m) for m in ds.clusters[cluster]]
        if any(len(s) <= seq_length - 2 for s in sequences) and text in sequences:
            whole += 1
        else:
            assert len(text) == seq_length - 2 and any(text in s for s in sequences)
            cropped += 1
    assert cropped and whole


def test_validation_set_is_fixed(sample_dir):
    clusters = ProteinClusters(
        sample_dir / "valid_clusters.parquet", sample_dir / "proteins.sqlite", "ur50_id"
    )
    ds = MLMDataset(clusters, 128, data_cfg(sample_dir), seed=7, shuffle=False)
    n = len(ds)
    assert all(clusters.num_members(c) == 1 for c in range(n))
    for g in range(3):
        assert np.array_equal(ds[g]["input_ids"], ds[g + n]["input_ids"])  # no reshuffle, epoch 0
        assert unmasked(ds[g]) in clusters.sequence(clusters[g][0])


def test_collate_padding():
    batch = [
        # A random replacement may be <pad> (all_tokens pool): still a real, attended position.
        {
            "input_ids": np.array([CLS_ID, PAD_ID, 6, EOS_ID]),
            "labels": np.array([-100, 5, -100, -100]),
        },
        {"input_ids": np.array([CLS_ID] + [7] * 9 + [EOS_ID]), "labels": np.full(11, -100)},
    ]
    out = collate(batch, pad_to="longest", seq_length=64)
    assert out["input_ids"].shape == (2, 16) and out["input_ids"].dtype == torch.int64  # 11 -> 16
    assert out["labels"].dtype == torch.int64 and out["attention_mask"].dtype == torch.bool
    assert out["attention_mask"].sum(1).tolist() == [4, 11]
    assert (out["input_ids"][0, 4:] == PAD_ID).all() and (
        out["labels"][0, 4:] == IGNORE_INDEX
    ).all()
    assert out["labels"][0, 1] == 5
    assert collate(batch, pad_to="max_length", seq_length=64)["input_ids"].shape == (2, 64)
    assert collate(batch, pad_to="longest", seq_length=12)["input_ids"].shape == (2, 12)  # capped


# ------------------------------------------------------------------------------------------ sampler


def step_batches(sampler, steps):
    """The sampler's micro-batches grouped by global step."""
    it = iter(sampler)
    return [[next(it) for _ in range(sampler.accum)] for _ in range(steps)]


def test_sampler_ranks_cover_each_global_step():
    micro, dp, accum = 2, 3, 2
    G = micro * dp * accum
    per_rank = [step_batches(GlobalBatchSampler(0, micro, r, dp, accum), 3) for r in range(dp)]
    for s in range(3):
        union = [g for r in range(dp) for batch in per_rank[r][s] for g in batch]
        assert sorted(union) == list(range(s * G, (s + 1) * G)) and len(set(union)) == G


def test_sampler_resume_continues_the_stream():
    micro, dp, accum = 2, 3, 2
    G = micro * dp * accum
    for r in range(dp):
        full = step_batches(GlobalBatchSampler(0, micro, r, dp, accum), 5)
        resumed = step_batches(GlobalBatchSampler(2 * G, micro, r, dp, accum), 3)
        assert resumed == full[2:]
    # Resuming at another world size (and micro batch) reads the next samples of the same stream.
    start = 2 * G
    per_rank = [step_batches(GlobalBatchSampler(start, 3, r, 2, 1), 2) for r in range(2)]
    union = sorted(g for r in range(2) for step in per_rank[r] for batch in step for g in batch)
    assert union == list(range(start, start + 12))


def test_dataloader_same_batches_for_any_worker_count_and_resume(sample_dir):
    def batches(num_workers, start_sample, k):
        loader = build_dataloader(
            data_cfg(sample_dir, num_workers=num_workers),
            seq_length=128,
            micro_batch_size=4,
            dp_rank=1,
            dp_size=2,
            grad_accumulation=1,
            start_sample=start_sample,
        )
        it = iter(loader)
        return [next(it) for _ in range(k)]

    serial = batches(0, 0, 6)
    parallel = batches(2, 0, 6)
    resumed = batches(0, 3 * 8, 3)  # 3 global steps of 8 samples done
    for a, b in zip(serial, parallel, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "attention_mask"))
    for a, b in zip(serial[3:], resumed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    ds = train_set(sample_dir, seed=data_cfg(sample_dir).seed)
    direct = collate([ds[g] for g in range(4, 8)], seq_length=128)  # rank 1's first micro-batch
    assert torch.equal(direct["input_ids"], serial[0]["input_ids"])
    assert serial[0]["input_ids"].shape[1] % 8 == 0


def test_valid_dataloader(sample_dir):
    loader = build_dataloader(
        data_cfg(sample_dir), 128, 4, 0, 1, 1, 0, split="valid", pad_to="max_length"
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 128)


# --------------------------------------------------------------------------------------------- prep

FASTA = """\
>UniRef90_A1 first protein
MKTAYIAKQR
QISFVKSHFS
>UniRef90_A2
mktayiakqrqisfvk
>UniRef90_B1 second cluster
GSHMLEDPVAGAAS
>UniRef90_B2
GSHMLEDPVAGA
ASKK
>UniRef90_C1 single
MSTNPKPQRKTKRN
>UniRef90_D1 not in the table
MADEEKLPPGWEKRMSR
"""
MEMBERS = """\
UniRef90_A1\tUniRef50_A1
UniRef90_A2\tUniRef50_A1
UniRef90_B1\tUniRef50_B
UniRef90_B2\tUniRef50_B
UniRef90_C1\tUniRef50_C1
"""


def test_prep_round_trip(tmp_path):
    (tmp_path / "in.fasta").write_text(FASTA)
    (tmp_path / "members.tsv").write_text(MEMBERS)
    counts = prepare(
        tmp_path / "in.fasta",
        tmp_path / "out",
        tmp_path / "members.tsv",
        valid_fraction=0.25,
        seed=3,
    )
    assert counts == {"sequences": 6, "clusters": 4, "train_clusters": 3, "valid_clusters": 1}

    expected = dict(read_fasta(tmp_path / "in.fasta"))
    assert (
        expected["UniRef90_A1"] == "MKTAYIAKQRQISFVKSHFS"
        and expected["UniRef90_A2"] == "MKTAYIAKQRQISFVK"
    )
    db = sqlite3.connect(tmp_path / "out" / "proteins.sqlite")
    assert dict(db.execute("SELECT id, sequence FROM protein")) == expected

    clusters = {
        "UniRef50_A1": ["UniRef90_A1", "UniRef90_A2"], "UniRef50_B": ["UniRef90_B1", "UniRef90_B2"],
        "UniRef50_C1": ["UniRef90_C1"], "UniRef90_D1": ["UniRef90_D1"],
    }  # fmt: skip
    train = pq.read_table(tmp_path / "out" / "train_clusters.parquet").to_pydict()
    valid = pq.read_table(tmp_path / "out" / "valid_clusters.parquet").column("ur50_id").to_pylist()
    for cluster, members in zip(train["ur50_id"], train["ur90_id"], strict=True):
        assert clusters[cluster] == members
    (held_out,) = set(clusters) - set(train["ur50_id"])
    assert valid == [clusters[held_out][0]]  # its representative, a protein id in the database
    train_ids = {m for members in train["ur90_id"] for m in members}
    assert not train_ids & set(clusters[held_out])
    assert train_ids | set(clusters[held_out]) == set(expected)

    again = prepare(
        tmp_path / "in.fasta",
        tmp_path / "again",
        tmp_path / "members.tsv",
        valid_fraction=0.25,
        seed=3,
    )
    assert again == counts
    assert (
        pq.read_table(tmp_path / "again" / "valid_clusters.parquet").column("ur50_id").to_pylist()
        == valid
    )


def test_sample_set_round_trip_and_determinism(sample_dir, tmp_path):
    db = dict(
        sqlite3.connect(sample_dir / "proteins.sqlite").execute("SELECT id, sequence FROM protein")
    )
    fasta = dict(read_fasta(sample_dir / "sequences.fasta"))
    assert db == fasta and len(fasta) > 120
    lengths = np.array([len(s) for s in fasta.values()])
    assert lengths.min() >= 30 and lengths.max() <= 2500
    generate(tmp_path, n_clusters=120, seed=1)
    assert (tmp_path / "sequences.fasta").read_text() == (
        sample_dir / "sequences.fasta"
    ).read_text()


@pytest.mark.parametrize(
    "fasta,members,message",
    [
        ("MKT\n>A\nMKT\n", None, "before the first '>'"),
        (">A\nMKT\n>A\nMKV\n", None, "duplicate id 'A'"),
        (">A\nMK1T\n", None, "residues must be letters"),
        (">A\n>B\nMKT\n", None, "record 'A' has no sequence"),
        (">A\nMKT\n>B\nMKV\n", "A\tC1\nZ\tC1\n", "member 'Z' is not in the FASTA"),
    ],
)
def test_prep_bad_input(tmp_path, fasta, members, message):
    (tmp_path / "in.fasta").write_text(fasta)
    tsv = None
    if members:
        tsv = tmp_path / "members.tsv"
        tsv.write_text(members)
    with pytest.raises(ValueError, match="--(fasta|clusters)") as err:
        prepare(tmp_path / "in.fasta", tmp_path / "out", tsv, valid_fraction=0)
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------- bad input


def test_missing_files_name_the_config_key(sample_dir, tmp_path):
    good = data_cfg(sample_dir)
    for key, split in [
        ("train_clusters", "train"),
        ("valid_clusters", "valid"),
        ("database", "train"),
    ]:
        cfg = good.model_copy(update={key: tmp_path / "missing"})
        with pytest.raises(FileNotFoundError, match=f"data.{key}.*make data"):
            build_dataloader(cfg, 128, 2, 0, 1, 1, 0, split=split)


def test_corrupt_or_wrong_files_name_the_config_key(sample_dir, tmp_path):
    db = sample_dir / "proteins.sqlite"
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match="data.train_clusters"):
        ProteinClusters(garbage, db)

    wrong_column = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"members": [["UniRef90_SYN00000M0"]]}), wrong_column)
    with pytest.raises(ValueError, match="data.valid_clusters.*no column 'ur50_id'"):
        ProteinClusters(wrong_column, db, "ur50_id", key="data.valid_clusters")

    clusters = sample_dir / "train_clusters.parquet"
    not_sqlite = tmp_path / "not.sqlite"
    not_sqlite.write_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match="data.database"):
        ProteinClusters(clusters, not_sqlite)
    no_table = tmp_path / "empty.sqlite"
    sqlite3.connect(no_table).execute("CREATE TABLE other (x)").connection.close()
    with pytest.raises(ValueError, match="data.database.*protein"):
        ProteinClusters(clusters, no_table)
