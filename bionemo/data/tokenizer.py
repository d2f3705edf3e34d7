"""The ESM-2 alphabet: 33 tokens, one character per residue, in the order ESM and BioNeMo use.

The order matters: checkpoints converted from ESM-2 / BioNeMo index their embedding rows by it.
`encode` maps residues only; the dataset adds <cls>/<eos> itself, after cropping.
"""

from __future__ import annotations

import numpy as np

TOKENS = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D",
    "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>",
)  # fmt: skip
VOCAB_SIZE = len(TOKENS)  # 33
TOKEN_TO_ID = {tok: i for i, tok in enumerate(TOKENS)}

CLS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3
MASK_ID = 32
AMINO_ACID_IDS = range(4, 24)  # the 20 standard amino acids, L through C
# Never selected for masking: these carry no residue to predict.
SPECIAL_IDS = (CLS_ID, PAD_ID, EOS_ID, MASK_ID)

assert VOCAB_SIZE == 33 and TOKENS[MASK_ID] == "<mask>" and TOKENS[AMINO_ACID_IDS[-1]] == "C"

# Byte -> id lookup table: every single-character token maps to itself, every other byte to <unk>.
_LOOKUP = np.full(256, UNK_ID, dtype=np.int64)
for _i, _tok in enumerate(TOKENS):
    if len(_tok) == 1:
        _LOOKUP[ord(_tok)] = _i


def encode(seq: str) -> np.ndarray:
    """Residues -> int64 ids, no special tokens. Unknown characters (lowercase too) -> <unk>."""
    # Non-ASCII characters become "?", which is not a token, so they map to <unk> as well.
    return _LOOKUP[np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)]


def decode(ids) -> str:
    """Ids -> string, special tokens written out as e.g. "<cls>"."""
    return "".join(TOKENS[int(i)] for i in ids)
