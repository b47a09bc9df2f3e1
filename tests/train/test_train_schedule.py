"""Learning-rate schedules: values at chosen steps equal the formulas."""

from __future__ import annotations

import math

import pytest

from memlm.train.schedule import Schedule, step_progress

PEAK, LOW = 1e-3, 1e-4


def test_linear_warmup():
    schedule = Schedule(PEAK, warmup=10, kind="cosine", min_frac=0.1)
    assert schedule(0, 0.0) == pytest.approx(PEAK / 10)
    assert schedule(4, 0.0) == pytest.approx(PEAK * 5 / 10)
    assert schedule(9, 0.0) == pytest.approx(PEAK)


@pytest.mark.parametrize("progress", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_cosine_decay(progress):
    schedule = Schedule(PEAK, warmup=10, kind="cosine", min_frac=0.1)
    assert schedule(10, progress) == pytest.approx(LOW + (PEAK - LOW) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_cosine_end_points_and_clamping():
    schedule = Schedule(PEAK, warmup=0, kind="cosine", min_frac=0.1)
    assert schedule(0, 0.0) == pytest.approx(PEAK)
    assert schedule(50, 0.5) == pytest.approx((PEAK + LOW) / 2)
    assert schedule(100, 1.0) == pytest.approx(LOW)
    assert schedule(120, 1.3) == pytest.approx(LOW)


def test_warmup_stable_decay():
    schedule = Schedule(PEAK, warmup=5, kind="wsd", min_frac=0.1, decay_frac=0.2)
    assert schedule(2, 0.0) == pytest.approx(PEAK * 3 / 5)
    assert schedule(5, 0.0) == PEAK
    assert schedule(50, 0.8) == PEAK
    assert schedule(60, 0.9) == pytest.approx(PEAK - (PEAK - LOW) * 0.5)
    assert schedule(70, 1.0) == pytest.approx(LOW)


def test_step_progress_counts_post_warmup_steps():
    assert step_progress(10, warmup=10, total_steps=110) == 0.0
    assert step_progress(60, warmup=10, total_steps=110) == 0.5
    assert step_progress(110, warmup=10, total_steps=110) == 1.0
    # the schedule of a 110-step run with 10 warmup steps at step 60
    assert Schedule(PEAK, 10)(60, step_progress(60, 10, 110)) == pytest.approx((PEAK + LOW) / 2)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule(PEAK, 0, kind="linear")(1, 0.5)
