"""Model families the trainer can build, chosen by `model.family` in the config."""

from __future__ import annotations

from torch import nn

from bionemo.config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model for cfg.family, freshly initialized from torch's global RNG."""
    if cfg.family == "esm2":
        from bionemo.models.esm2 import ESM2

        return ESM2(cfg)
    if cfg.family == "geneformer":
        from bionemo.models.geneformer import Geneformer

        return Geneformer(cfg)
    raise ValueError(f"model.family {cfg.family!r} is unknown; known families: 'esm2', 'geneformer'")
