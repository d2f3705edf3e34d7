"""A 2-layer bidirectional GRU masked language model over the ESM-2 alphabet: not a transformer,
to show that the trainer asks a plugin for nothing but a module with a loss.

    trainer.model.plugin: tiny_plugin.model:build     (family esm2: the protein data pipeline)

It implements the whole plugin interface of bionemo/models/__init__.py: build(cfg) -> module,
module.loss(batch) -> scalar, module.export(folder); load(folder) reads an export back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bionemo.data.masking import IGNORE_INDEX  # -100: positions that are not scored
from bionemo.data.tokenizer import PAD_ID


class TinyGRU(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        if hidden_size % 2:
            raise ValueError(
                f"tiny_plugin: hidden_size {hidden_size} must be even (two "
                "directions of hidden_size/2 each)"
            )
        self.shape = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers)
        self.embed = nn.Embedding(vocab_size, hidden_size, padding_idx=PAD_ID)
        self.gru = nn.GRU(
            hidden_size,
            hidden_size // 2,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [batch, length, vocab]. Packing by length keeps padding out of both directions."""
        lengths = attention_mask.sum(dim=1).clamp(min=1).cpu()
        packed = pack_padded_sequence(
            self.embed(input_ids), lengths, batch_first=True, enforce_sorted=False
        )
        hidden, _ = pad_packed_sequence(
            self.gru(packed)[0], batch_first=True, total_length=input_ids.shape[1]
        )
        return self.head(self.norm(hidden))

    def loss(self, input_ids, attention_mask, labels, cu_seqlens=None, max_seqlen=None):
        if cu_seqlens is not None:
            raise ValueError(
                "tiny_plugin reads padded batches only; set trainer.data.pad_to=longest (not none)"
            )
        logits = self.forward(input_ids, attention_mask).float()
        total = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
        )
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)  # 0, not NaN, if none scored

    def export(self, out_dir: Path) -> None:
        """Weights (safetensors) and shape (config.json); `load(out_dir)` rebuilds the model."""
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(Path(out_dir) / "model.safetensors"))
        (Path(out_dir) / "config.json").write_text(
            json.dumps({"architecture": "TinyGRU", **self.shape}, indent=2) + "\n"
        )


def build(cfg) -> TinyGRU:
    """The plugin factory: trainer.model (bionemo.config.ModelConfig) -> the model."""
    return TinyGRU(cfg.vocab_size, cfg.hidden_size, cfg.num_layers)


def load(folder: str | Path) -> TinyGRU:
    """A model that export() wrote."""
    shape = json.loads((Path(folder) / "config.json").read_text())
    shape.pop("architecture")
    model = TinyGRU(**shape)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model
