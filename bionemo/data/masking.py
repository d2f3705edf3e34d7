"""BERT-style masking for masked-language-model pretraining, as BioNeMo's ESM-2 recipe does it.

Each position is selected independently with probability mask_prob (a Bernoulli draw per
position, as BioNeMo does, rather than picking exactly round(mask_prob * n) positions), so short
sequences can get zero or several extra selections; the expected rate is what matters. Special
tokens (<cls>, <eos>, <pad>, <mask>) are never selected. Each selected position then gets one
uniform draw u: u < mask_token_prob -> <mask>; the next random_token_prob of the range -> a random
token from the pool; the rest keep their residue (the model still has to predict it).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from bionemo.data.tokenizer import AMINO_ACID_IDS, MASK_ID, SPECIAL_IDS, VOCAB_SIZE

IGNORE_INDEX = -100  # label value that torch.nn.functional.cross_entropy skips by default


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_prob: float,
    mask_token_prob: float,
    random_token_prob: float,
    random_token_pool: Literal["all_tokens", "amino_acids_only"],
) -> tuple[np.ndarray, np.ndarray]:
    """Return (input_ids, labels): labels hold the original token where selected, -100 elsewhere."""
    tokens = np.asarray(tokens, dtype=np.int64)
    selected = (rng.random(tokens.shape) < mask_prob) & ~np.isin(tokens, SPECIAL_IDS)
    u = rng.random(tokens.shape)
    to_mask = selected & (u < mask_token_prob)
    to_random = selected & (u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)

    if random_token_pool == "all_tokens":  # BioNeMo's default: the whole vocabulary, specials too
        low, high = 0, VOCAB_SIZE
    elif random_token_pool == "amino_acids_only":
        low, high = AMINO_ACID_IDS.start, AMINO_ACID_IDS.stop
    else:
        raise ValueError(
            f"random_token_pool must be all_tokens or amino_acids_only, got {random_token_pool!r}"
        )

    input_ids = tokens.copy()
    input_ids[to_mask] = MASK_ID
    input_ids[to_random] = rng.integers(low, high, size=int(to_random.sum()))
    labels = np.where(selected, tokens, IGNORE_INDEX)
    return input_ids, labels
