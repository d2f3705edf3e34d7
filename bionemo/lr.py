"""Learning-rate schedules as a multiplier of the peak learning rate, pure functions of the step.

`k` is the 0-based optimizer step, W the warmup steps, M the last step of the schedule
(optim.decay_steps, default train.max_steps), r = min_lr / lr.

- "warmup_anneal_decay_hold": BioNeMo's ESM-2 schedule (its WarmupAnnealDecayHold `get_lr`),
  exactly: k < W: r + (1 - r) k / W (so step 0 trains at min_lr, not at 0); then
  max(1 - (k - W) / (M - W), r): a line towards 0 at M, held at the floor from
  k = W + (1 - r)(M - W) on (450,200 of 500,000 with the 650M settings).
- "cosine": BioNeMo's Geneformer schedule (NeMo's CosineAnnealing with warmup and constant steps
  H): k <= W: (k + 1) / (W + 1); then a half cosine from 1 to r over D = M - W - H steps; r after.
- "linear": this project's earlier shape: (k + 1) / W during warmup, a line from 1 to r reaching
  the floor at M.
"""

from __future__ import annotations

import math

SCHEDULES = ("warmup_anneal_decay_hold", "cosine", "linear")


def lr_multiplier(
    step: int, schedule: str, *, warmup: int, last: int, min_ratio: float, hold: int = 0
) -> float:
    if schedule == "warmup_anneal_decay_hold":
        if step < warmup:
            return min_ratio + (1.0 - min_ratio) * step / warmup
        if last <= warmup:
            return min_ratio
        return max(1.0 - (step - warmup) / (last - warmup), min_ratio)
    if schedule == "cosine":
        if warmup > 0 and step <= warmup:
            return (step + 1) / (warmup + 1)
        decay = last - warmup - hold
        if decay <= 0 or step > warmup + decay:
            return min_ratio
        return min_ratio + (1.0 - min_ratio) * 0.5 * (
            1.0 + math.cos(math.pi * (step - warmup) / decay)
        )
    if schedule == "linear":
        if step < warmup:
            return (step + 1) / warmup
        if step >= last or last <= warmup:
            return min_ratio
        return 1.0 - (1.0 - min_ratio) * (step - warmup) / (last - warmup)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
