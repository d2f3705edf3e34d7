"""Protein data for masked-language-model pretraining (ESM-2, BioNeMo's UniRef layout).

  tokenizer  the 33-token ESM alphabet: encode / decode and the special ids
  masking    BERT-style 15% / 80-10-10 masking
  dataset    ProteinClusters, MLMDataset, GlobalBatchSampler, collate, build_dataloader (torch)
  prep       FASTA (+ member -> cluster TSV) -> parquet + SQLite  (python -m bionemo.data.prep)
  sample     a synthetic sample set, built through prep         (python -m bionemo.data.sample)

Only the torch-free modules are imported here, so `python -m bionemo.data.sample` stays quick;
import the loader from bionemo.data.dataset.
"""

from bionemo.data.masking import IGNORE_INDEX, mask_tokens
from bionemo.data.tokenizer import (
    AMINO_ACID_IDS,
    CLS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    TOKENS,
    UNK_ID,
    VOCAB_SIZE,
    decode,
    encode,
)

__all__ = [
    "AMINO_ACID_IDS", "CLS_ID", "EOS_ID", "IGNORE_INDEX", "MASK_ID", "PAD_ID", "TOKENS", "UNK_ID",
    "VOCAB_SIZE", "decode", "encode", "mask_tokens",
]  # fmt: skip
