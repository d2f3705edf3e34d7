"""BioNeMo's warmup-anneal-decay-hold schedule as a multiplier of the peak learning rate."""

from __future__ import annotations


def warmup_decay_hold(step: int, warmup: int, decay_until: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, linear decay to `min_ratio` at `decay_until`, hold."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_until or decay_until <= warmup:
        return min_ratio
    frac = (step - warmup) / (decay_until - warmup)
    return 1.0 - (1.0 - min_ratio) * frac
