"""Fine-tuning (trainer.task.kind != mlm): a head on the encoder, its loss, optimizer groups,
validation metrics and export. The engine and the loop stay those of pretraining:

    model = task_model(cfg, encoder)      # the encoder itself for mlm; else TaskModel
    param_sets(model, cfg)                # [(params, extra group keys)]: encoder, head (lr_scale)
    evaluate(engine, cfg, loader, device) # the "valid" metrics record
    export_head(state_dict, cfg, out)     # head.safetensors + head_config.json beside the encoder

TaskModel has the encoder's `loss(input_ids, attention_mask, labels, ...)` signature, so the
engine's loss wrapper, DDP, regional compile (`layers`) and checkpoints treat it as any model; its
state dict is the encoder's under `encoder.` and the head's under `head.`. The encoder's LM head
is kept (and exported unchanged) but frozen: nothing here trains it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bionemo.config import TrainerConfig
from bionemo.data.masking import IGNORE_INDEX
from bionemo.models.heads import SequenceHead, TokenHead

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"


class TaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, task):
        super().__init__()
        self.encoder, self.kind = encoder, task.kind
        self.cfg = encoder.cfg
        h = encoder.cfg.hidden_size
        outputs = 1 if task.kind == "sequence_regression" else task.num_classes
        if task.kind == "token_classification":
            self.head = TokenHead(h, outputs, task.head_dropout)
        else:
            self.head = SequenceHead(h, outputs, task.head_dropout, task.pooling)

    @property
    def layers(self) -> nn.ModuleList:  # what regional compile compiles (distributed.parallel)
        return self.encoder.layers

    def forward(self, input_ids, attention_mask, cu_seqlens=None, max_seqlen=None):
        """Head outputs: [B] standardized predictions (regression), [B, K] or [B, S, K] logits."""
        hidden = self.encoder(input_ids, attention_mask, cu_seqlens, max_seqlen)
        out = self.head(hidden, attention_mask)
        return out.squeeze(-1) if self.kind == "sequence_regression" else out

    def loss(self, input_ids, attention_mask, labels, cu_seqlens=None, max_seqlen=None):
        """MSE of standardized labels (regression) or cross-entropy (classification; token
        classification over labelled residues only), in fp32."""
        out = self.forward(input_ids, attention_mask, cu_seqlens, max_seqlen).float()
        if self.kind == "sequence_regression":
            target = (labels.float() - self.head.label_shift) / self.head.label_scale
            return F.mse_loss(out, target)
        if self.kind == "sequence_classification":
            return F.cross_entropy(out, labels)
        total = F.cross_entropy(
            out.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def task_model(cfg: TrainerConfig, encoder: nn.Module, *, read_labels: bool = True) -> nn.Module:
    """The module to train: `encoder` for mlm; else TaskModel, with the encoder frozen when
    task.freeze_encoder and its LM head always. read_labels: set the regression head's label
    standardization from the training split (an export loads it from the checkpoint instead).
    The head draws its initial weights from torch's global RNG, seeded alike on every rank."""
    task = cfg.task
    if not task.fine_tuning:
        return encoder
    # The LM head's own parameters (its decoder is the word embedding, which the encoder trains
    # unless frozen); frozen parameters are outside DDP's reduction and the optimizer.
    for p in (encoder if task.freeze_encoder else encoder.lm_head).parameters():
        p.requires_grad_(False)
    device = next(encoder.parameters()).device
    model = TaskModel(encoder, task).to(device)
    if read_labels and task.kind == "sequence_regression":
        from bionemo.data.labelled import open_table

        mean, std = open_table(task, cfg.data.seed).label_stats()
        model.head.label_shift.fill_(mean)
        model.head.label_scale.fill_(std)
    return model


def param_sets(model: nn.Module, cfg: TrainerConfig) -> list[tuple[list, dict]]:
    """Trainable parameters by learning rate: [(params, extra param-group keys)]. The head's
    group carries lr_scale = head_lr / optim.lr (the engine multiplies the scheduled lr by it)."""
    if not isinstance(model, TaskModel):
        return [(list(model.parameters()), {})]
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    scale = (cfg.task.head_lr or cfg.optim.lr) / cfg.optim.lr
    return [(ps, extra) for ps, extra in ((encoder, {}), (head, {"lr_scale": scale})) if ps]


# --------------------------------------------------------------------------------- validation


@torch.no_grad()
def evaluate(engine, cfg: TrainerConfig, loader, device: torch.device) -> dict:
    """The whole validation split once, over all ranks: loss, and MSE, Pearson and Spearman
    (regression, in label units) or accuracy (classification; token classification over the
    labelled residues). train.limit_val_batches does not cap it: the metrics need every row."""
    from bionemo.data.labelled import open_table
    from bionemo.engines.torch_engine import to_device

    n = len(open_table(cfg.task, cfg.data.seed).rows["valid"])
    micro, dp, rank = cfg.train.micro_batch_size, engine.dp_size, engine.dp_rank
    model, kind = engine.model, cfg.task.kind
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    preds, targets = [], []
    model.eval()
    try:
        for k, batch in zip(range(math.ceil(n / (micro * dp))), loader):
            # Batch k of this rank holds validation samples k*micro*dp + rank*micro + [0, micro)
            # (GlobalBatchSampler); those past n wrap around and are not counted twice.
            first = k * micro * dp + rank * micro
            keep = (torch.arange(first, first + len(batch["labels"])) < n).to(device)
            b = to_device(batch, device)
            with engine.autocast:
                out = model(b["input_ids"], b["attention_mask"]).float()
            y = b["labels"]
            if kind == "sequence_regression":
                pred = out * model.head.label_scale + model.head.label_shift
                preds.append(pred[keep].double().cpu().numpy())
                targets.append(y[keep].double().cpu().numpy())
                continue
            if kind == "token_classification":
                keep = keep[:, None] & (y != IGNORE_INDEX)
                out, y, keep = out.flatten(0, 1), y.flatten(), keep.flatten()
            ce = F.cross_entropy(out, y.clamp(min=0), reduction="none")
            sums += torch.stack(
                [(ce * keep).sum(), ((out.argmax(-1) == y) & keep).sum(), keep.sum()]
            ).double()
    finally:
        model.train()
    if kind != "sequence_regression":
        if dist.is_initialized():
            dist.all_reduce(sums)
        loss, correct, count = sums.tolist()
        return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1)}
    pred, y = _gather(np.concatenate(preds)), _gather(np.concatenate(targets))
    mse = float(np.mean((pred - y) ** 2))
    scale = float(model.head.label_scale)
    return {
        "loss": mse / scale**2,
        "mse": mse,
        "pearson": _pearson(pred, y),
        "spearman": _pearson(_ranks(pred), _ranks(y)),
    }


def _gather(x: np.ndarray) -> np.ndarray:
    if not dist.is_initialized():
        return x
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x)
    return np.concatenate(parts)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """None when either side is constant (the correlation is undefined)."""
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (Spearman's convention)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


# --------------------------------------------------------------------------------- export


def split_state(state_dict: dict) -> tuple[dict, dict]:
    """A TaskModel's state dict -> (the encoder's, the head's), each without its prefix."""
    parts: dict[str, dict] = {"encoder.": {}, "head.": {}}
    for k, v in state_dict.items():
        prefix = next(p for p in parts if k.startswith(p))
        parts[prefix][k[len(prefix) :]] = v
    return parts["encoder."], parts["head."]


def head_files(head_state: dict, cfg: TrainerConfig) -> dict[str, bytes]:
    """head.safetensors (the head's tensors, fp32) and head_config.json (what they compute)."""
    from safetensors.torch import save

    task = cfg.task
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in head_state.items()}
    config = {
        "task": task.kind,
        "pooling": None if task.kind == "token_classification" else task.pooling,
        "hidden_size": cfg.model.hidden_size,
        "num_outputs": 1 if task.kind == "sequence_regression" else task.num_classes,
        "layers": "net.0 dropout, net.1 Linear(H, H), net.2 GELU (erf), net.3 dropout, "
        "net.4 Linear(H, num_outputs)",
        "input": "the encoder's final hidden states (after its final LayerNorm): "
        + (
            "every position"
            if task.kind == "token_classification"
            else "mean over residues, without <cls>, <eos> and padding"
            if task.pooling == "mean"
            else "the <cls> position"
        ),
        "id2label": _class_names(cfg),
    }
    if task.kind == "sequence_regression":
        config["prediction"] = "output * label_scale + label_shift (label units)"
    return {
        HEAD_WEIGHTS: save(tensors, metadata={"format": "pt"}),
        HEAD_CONFIG: (json.dumps(config, indent=2) + "\n").encode(),
    }


def _class_names(cfg: TrainerConfig) -> dict | None:
    """Class id -> name when the labels were names (read from the table; None when they were
    ids, or the table is not at hand)."""
    if cfg.task.kind == "sequence_regression":
        return None
    from bionemo.data.labelled import open_table

    try:
        names = open_table(cfg.task, cfg.data.seed).class_names
    except (OSError, ValueError):
        return None
    return None if names is None else {str(i): n for i, n in enumerate(names)}
