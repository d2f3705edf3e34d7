"""Fine-tuning heads on top of an encoder's final hidden states (bionemo/finetune.py builds them).

Both heads are the same two-layer MLP, dropout -> Linear(H, H) -> GELU -> dropout -> Linear(H, K):
the sequence head after pooling each sequence into one vector, the token head at every position.
Pooling ("mean", the default): the mean over the residues, leaving out <cls>, <eos> and padding,
so a sequence's vector does not depend on how its batch was padded; "cls": the <cls> position.
Regression heads predict standardized labels, (y - label_shift) / label_scale, with the shift and
scale of the training split kept as buffers (saved, loaded and exported with the head), so a
target in any unit starts near the head's initial output.
"""

from __future__ import annotations

import torch
from torch import nn


def residue_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] True at residues: real tokens other than the first (<cls>) and the last (<eos>)."""
    mask = attention_mask.bool().clone()
    mask[:, 0] = False
    last = attention_mask.sum(-1, dtype=torch.long) - 1
    mask[torch.arange(mask.shape[0], device=mask.device), last] = False
    return mask


class MLPHead(nn.Module):
    def __init__(self, hidden: int, outputs: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SequenceHead(MLPHead):
    """[B, S, H] hidden states -> [B, K]."""

    def __init__(self, hidden: int, outputs: int, dropout: float, pooling: str):
        super().__init__(hidden, outputs, dropout)
        self.pooling = pooling
        # Regression's label standardization (identity for classification).
        self.register_buffer("label_shift", torch.zeros(()))
        self.register_buffer("label_scale", torch.ones(()))

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        w = residue_mask(attention_mask).unsqueeze(-1).to(torch.float32)
        return (hidden.float() * w).sum(1) / w.sum(1).clamp(min=1)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(hidden, attention_mask)
        return super().forward(pooled.to(self.net[1].weight.dtype))


class TokenHead(MLPHead):
    """[B, S, H] hidden states -> [B, S, K]."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden)
