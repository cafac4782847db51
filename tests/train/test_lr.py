"""Learning-rate and weight-decay schedules: VAR's lin0, cos, warmup."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from varkit.recipe.train import TrainConfig
from varkit.train.lr import LIN0_FLAT, lr_at, lr_factor, weight_decay_at


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(steps=kw.pop("steps", 1000), lr=1.0, **kw)


def test_warmup_starts_at_ratio_and_reaches_peak():
    cfg = _cfg(warmup_steps=100, warmup_start_ratio=0.005, schedule="constant")
    assert lr_at(cfg, 0, 1000) == pytest.approx(0.005)
    assert lr_at(cfg, 50, 1000) == pytest.approx(0.005 + 0.995 * 0.5)
    assert lr_at(cfg, 100, 1000) == pytest.approx(1.0)
    assert lr_at(cfg, 999, 1000) == pytest.approx(1.0)


def test_lin0_is_flat_then_linear_to_final_ratio():
    cfg = _cfg(warmup_steps=0, schedule="lin0", final_lr_ratio=0.1)
    total = 1001  # 1000 steps after warmup: the flat part is steps 0..49
    assert lr_at(cfg, 0, total) == 1.0
    assert lr_at(cfg, 49, total) == 1.0
    assert lr_at(cfg, 50, total) == pytest.approx(1.0)  # the line starts at the peak
    assert lr_at(cfg, 1000, total) == pytest.approx(0.1)
    mid = 50 + (1000 - 50) / 2
    assert lr_at(cfg, int(mid), total) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-3)


def test_cos_halfway_is_the_mean_of_peak_and_floor():
    cfg = _cfg(warmup_steps=0, schedule="cos", final_lr_ratio=0.2)
    assert lr_at(cfg, 0, 101) == pytest.approx(1.0)
    assert lr_at(cfg, 50, 101) == pytest.approx(0.6)
    assert lr_at(cfg, 100, 101) == pytest.approx(0.2)


def test_default_warmup_is_a_fiftieth_of_the_run_and_peak_follows_batch():
    cfg = TrainConfig(steps=500, batch_size=512)
    assert cfg.warmup(500) == 10
    assert cfg.peak_lr == pytest.approx(2e-4)  # 1e-4 per 256 images
    assert lr_at(cfg, 10, 500) == pytest.approx(2e-4)


def test_weight_decay_cosine_from_start_to_end():
    cfg = _cfg(weight_decay=0.05, weight_decay_end=0.08)
    assert weight_decay_at(cfg, 0, 101) == pytest.approx(0.05)
    assert weight_decay_at(cfg, 50, 101) == pytest.approx(0.065)
    assert weight_decay_at(cfg, 100, 101) == pytest.approx(0.08)
    assert weight_decay_at(_cfg(weight_decay=0.05), 70, 101) == 0.05


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="lin0"):
        lr_factor(5, 10, warmup=0, schedule="step", warmup_start_ratio=0.0, final_lr_ratio=0.1)


@given(
    total=st.integers(2, 5000),
    warm_frac=st.floats(0, 0.5),
    schedule=st.sampled_from(["lin0", "cos", "constant"]),
    start=st.floats(0, 1),
    final=st.floats(0, 1),
)
# warmup ends on the last step: the step after warmup is the peak, not the floor
@example(total=2, warm_frac=0.5, schedule="lin0", start=1.0, final=0.0)
def test_lr_stays_between_floor_and_peak_and_never_rises_after_warmup(
    total, warm_frac, schedule, start, final
):
    warmup = int(warm_frac * total)
    kw = dict(warmup=warmup, schedule=schedule, warmup_start_ratio=start, final_lr_ratio=final)
    values = [lr_factor(s, total, **kw) for s in range(total)]
    low = min(start, final) if warmup else final
    assert all(low - 1e-9 <= v <= 1.0 + 1e-9 for v in values)
    after = values[warmup:]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(after))
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(values[: warmup + 1]))
    if schedule != "constant" and total - 1 > warmup:
        assert math.isclose(values[-1], final, abs_tol=1e-9)


def test_lin0_flat_share_is_vars_five_percent():
    assert LIN0_FLAT == 0.05
