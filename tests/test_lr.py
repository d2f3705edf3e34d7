"""Learning-rate schedules against values computed independently from BioNeMo's formulas."""

from __future__ import annotations

import math

import pytest

from bionemo.lr import lr_multiplier

# ESM-2 650M: lr 4e-4, min_lr = lr/10, W = 2000, M = 500,000 (BioNeMo's train_esm2 defaults).
LR, MIN, W, M = 4e-4, 4e-5, 2000, 500_000


def bionemo_esm2(k: int) -> float:
    """BioNeMo's WarmupAnnealDecayHold get_lr, written from its published formula."""
    if k < W:
        return MIN + (LR - MIN) * k / W
    return max(LR * (1 - (k - W) / (M - W)), MIN)


@pytest.mark.parametrize(
    "k",
    [
        0,
        1,
        999,
        1999,
        2000,
        2001,
        100_000,
        250_000,
        450_000,
        450_199,
        450_200,
        450_201,
        499_999,
        500_000,
        600_000,
    ],
)
def test_esm2_schedule_is_bionemos(k):
    ours = LR * lr_multiplier(k, "warmup_anneal_decay_hold", warmup=W, last=M, min_ratio=0.1)
    assert ours == pytest.approx(bionemo_esm2(k), rel=1e-12, abs=1e-18)


def test_esm2_schedule_landmarks():
    def at(k):
        return LR * lr_multiplier(k, "warmup_anneal_decay_hold", warmup=W, last=M, min_ratio=0.1)

    assert at(0) == pytest.approx(4e-5)  # starts at min_lr, not at 0
    assert at(450_000) == pytest.approx(4.016e-5, rel=1e-3)  # the earlier linear shape: 7.6e-5
    assert at(450_200) == pytest.approx(MIN) and at(450_199) > MIN  # floor reached at 450,200


# Geneformer: lr 1e-3, min_lr lr/100, warmup ceil(1% of 400k), constant ceil(5% of 400k).
G_LR, G_MIN, GW, GM, GH = 1e-3, 1e-5, 4000, 400_000, 20_000


def nemo_cosine(k: int) -> float:
    """NeMo's CosineAnnealing with warmup and constant steps (BioNeMo's Geneformer scheduler)."""
    decay = GM - GW - GH
    if k <= GW:
        return G_LR * (k + 1) / (GW + 1)
    if GW + decay < k:
        return G_MIN
    return G_MIN + (G_LR - G_MIN) * 0.5 * (1 + math.cos(math.pi * (k - GW) / decay))


@pytest.mark.parametrize(
    "k",
    [
        0,
        1,
        3999,
        4000,
        4001,
        100_000,
        190_000,
        379_999,
        380_000,
        380_001,
        399_999,
        400_000,
        500_000,
    ],
)
def test_geneformer_cosine_is_nemos(k):
    ours = G_LR * lr_multiplier(k, "cosine", warmup=GW, last=GM, min_ratio=0.01, hold=GH)
    assert ours == pytest.approx(nemo_cosine(k), rel=1e-12, abs=1e-18)


def test_linear_shape_kept_as_option():
    lr = [lr_multiplier(s, "linear", warmup=10, last=110, min_ratio=0.1) for s in range(200)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(1 - 0.9 * 0.5)
    assert all(v == pytest.approx(0.1) for v in lr[110:])


def test_geneformer_presets_use_cosine():
    import yaml

    from bionemo.config import OptimConfig
    from tests.conftest import REPO_ROOT

    for name in ("geneformer_10m", "geneformer_106m", "geneformer_4b"):
        optim = yaml.safe_load((REPO_ROOT / "configs/models" / f"{name}.yaml").read_text())[
            "trainer"
        ]["optim"]
        cfg = OptimConfig(**optim)
        assert (cfg.schedule, cfg.warmup_steps, cfg.hold_steps, cfg.min_lr_ratio) == (
            "cosine",
            4000,
            20_000,
            0.01,
        )
