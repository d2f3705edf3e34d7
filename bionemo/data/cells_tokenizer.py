"""Geneformer's tokenizer: a gene vocabulary, rank-value encoding of a cell, and MLM masking.

Torch-free (numpy only), so the sample builder and the tests use it without the loader.

Vocabulary. A file shipped with the data set maps tokens to ids: special tokens first, then one
token per gene (its Ensembl id). BioNeMo's Geneformer has five specials, in this order:

    0 <cls>   1 <mask>   2 <pad>   3 <sep>   4 <unk>        then ENSG... from id 5

BioNeMo spells them [CLS] [MASK] [PAD] [SEP] [UKW], the original Geneformer <cls> <mask> <pad>
<eos>; every spelling below is recognised, and the ids are whatever the file says. <pad>, <mask>
and <cls> are required; every other token is a gene.

Rank-value encoding (Theodoris et al. 2023), for one cell with raw counts c_g:
    x_g = c_g / sum(c) * normalize_total / median_g       (median_g: the gene's median over the
                                                            corpus of its non-zero normalised value)
    tokens = <cls>, then the genes with c_g > 0 in decreasing x_g, cut to seq_length tokens.
Dividing by the cell's total scales every gene alike, so only the median changes the order; it is
kept so that x is the value Geneformer defines. Genes missing from the vocabulary are dropped
(as BioNeMo does). Ties keep the data set's column order (a stable sort), so the encoding is a
pure function of the cell.

Masking follows bionemo.data.masking (BioNeMo's BERT recipe): each non-special position is
selected with probability mask_prob, then one draw u: u < mask_token_prob -> <mask>, the next
random_token_prob -> a random *gene* (BioNeMo draws from the gene tokens only), else unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bionemo.config_data import read_vocab_tokens
from bionemo.data.masking import IGNORE_INDEX

# Spellings of each special token: ours (the sample's), BioNeMo's, the original Geneformer's.
SPECIAL_SPELLINGS = {
    "cls": ("<cls>", "[CLS]"),
    "mask": ("<mask>", "[MASK]"),
    "pad": ("<pad>", "[PAD]"),
    "sep": ("<sep>", "[SEP]", "<eos>", "[EOS]"),
    "unk": ("<unk>", "[UKW]", "[UNK]"),
}
# The sample set's specials, in BioNeMo's order (so a BioNeMo checkpoint's embedding rows line up).
SAMPLE_SPECIALS = ("<cls>", "<mask>", "<pad>", "<sep>", "<unk>")
_ROLE_OF = {s: role for role, spellings in SPECIAL_SPELLINGS.items() for s in spellings}


@dataclass
class GeneVocab:
    """token -> id for specials and genes; `key` names the config key in error messages."""

    tokens: dict[str, int]
    key: str = "data.vocab"
    special: dict[str, int] = field(init=False)  # role ("cls", "pad", ...) -> id
    gene_to_id: dict[str, int] = field(init=False)
    gene_token_ids: np.ndarray = field(init=False)  # ids a random replacement is drawn from
    special_ids: np.ndarray = field(init=False)  # never selected for masking

    def __post_init__(self):
        ids = sorted(self.tokens.values())
        if ids != list(range(len(ids))):
            raise ValueError(
                f"{self.key}: token ids must be 0..{len(ids) - 1} with no gaps or repeats"
            )
        self.special, self.gene_to_id = {}, {}
        for tok, i in self.tokens.items():
            role = _ROLE_OF.get(tok)
            if role is None:
                self.gene_to_id[tok] = i
            elif role in self.special:
                raise ValueError(f"{self.key}: two spellings of the {role} token ({tok!r})")
            else:
                self.special[role] = i
        missing = [r for r in ("pad", "mask", "cls") if r not in self.special]
        if missing:
            raise ValueError(
                f"{self.key}: no {'/'.join(missing)} token (looked for "
                f"{', '.join(SPECIAL_SPELLINGS[missing[0]])}); Geneformer needs <pad>, <mask> and "
                f"<cls> before the genes"
            )
        if not self.gene_to_id:
            raise ValueError(f"{self.key}: the vocabulary has special tokens only, no genes")
        self.gene_token_ids = np.array(sorted(self.gene_to_id.values()), dtype=np.int64)
        self.special_ids = np.array(sorted(self.special.values()), dtype=np.int64)

    @classmethod
    def load(cls, path, key: str = "data.vocab") -> "GeneVocab":
        """Read a vocabulary: JSON {token: id} or [token, ...], or text with one token a line."""
        return cls(read_vocab_tokens(path, key), key)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def cls_id(self) -> int:
        return self.special["cls"]

    @property
    def mask_id(self) -> int:
        return self.special["mask"]

    @property
    def pad_id(self) -> int:
        return self.special["pad"]


def load_gene_medians(path, vocab: GeneVocab, key: str = "data.gene_medians") -> dict[str, float]:
    """Ensembl id -> median; every gene of the vocabulary must have a positive one."""
    path = Path(path)
    try:
        medians = json.loads(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"{key}: cannot read {path} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{key}: {path} is not valid JSON ({e})") from None
    missing = [g for g in vocab.gene_to_id if g not in medians]
    if missing:
        raise ValueError(
            f"{key}: {len(missing)} genes of {vocab.key} have no median in {path} (e.g. "
            f"{missing[0]}); the vocabulary and the medians must come from the same data set"
        )
    bad = [g for g in vocab.gene_to_id if not medians[g] > 0]
    if bad:
        raise ValueError(f"{key}: gene {bad[0]} has median {medians[bad[0]]}; medians must be > 0")
    return {g: float(medians[g]) for g in vocab.gene_to_id}


def column_lookup(
    feature_ids, vocab: GeneVocab, medians: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per column of a count matrix: its token id (-1: not in the vocabulary) and median."""
    token = np.array([vocab.gene_to_id.get(str(f), -1) for f in feature_ids], dtype=np.int64)
    median = np.array([medians.get(str(f), np.nan) for f in feature_ids], dtype=np.float64)
    return token, median


def rank_value_encode(
    values: np.ndarray,
    columns: np.ndarray,
    col_token: np.ndarray,
    col_median: np.ndarray,
    *,
    cls_id: int,
    seq_length: int,
    normalize_total: float,
) -> np.ndarray:
    """One cell's sparse row (values at columns) -> int64 tokens: <cls> then ranked genes."""
    values = np.asarray(values, dtype=np.float64)
    columns = np.asarray(columns, dtype=np.int64)
    total = values.sum()
    tokens = col_token[columns]
    keep = (values > 0) & (tokens >= 0)  # expressed, and in the vocabulary
    if not keep.any():
        return np.array([cls_id], dtype=np.int64)
    x = values[keep] / total * normalize_total / col_median[columns[keep]]
    order = np.argsort(-x, kind="stable")  # descending; ties keep column order
    genes = tokens[keep][order][: seq_length - 1]  # room for <cls>
    return np.concatenate(([cls_id], genes)).astype(np.int64)


def mask_genes(
    tokens: np.ndarray,
    rng: np.random.Generator,
    vocab: GeneVocab,
    *,
    mask_prob: float,
    mask_token_prob: float,
    random_token_prob: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels): labels hold the original gene where selected, IGNORE_INDEX elsewhere."""
    tokens = np.asarray(tokens, dtype=np.int64)
    selected = (rng.random(tokens.shape) < mask_prob) & ~np.isin(tokens, vocab.special_ids)
    u = rng.random(tokens.shape)
    to_mask = selected & (u < mask_token_prob)
    to_random = selected & (u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)
    input_ids = tokens.copy()
    input_ids[to_mask] = vocab.mask_id
    pool = vocab.gene_token_ids
    input_ids[to_random] = pool[rng.integers(len(pool), size=int(to_random.sum()))]
    labels = np.where(selected, tokens, IGNORE_INDEX)
    return input_ids, labels
