"""metaopt.stats against scipy's Student-t interval and a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from metaopt.stats import Interval, mean_interval, paired_difference, verdict


def test_mean_interval_matches_scipy_t_interval():
    values = [0.12, 0.31, 0.25, 0.18, 0.22]
    got = mean_interval(values, 0.95)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (got.n, got.mean) == (5, pytest.approx(np.mean(values)))
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))


def test_mean_interval_by_hand_at_90_percent():
    # values 1, 2, 3: mean 2, s = 1, t_{0.95, 2} = 2.919986 -> half width 2.919986 / sqrt(3)
    got = mean_interval([1.0, 2.0, 3.0], 0.90)
    half = 2.919986 / math.sqrt(3)
    assert (got.low, got.high) == (pytest.approx(2 - half, abs=1e-5), pytest.approx(2 + half, abs=1e-5))


def test_mean_interval_drops_nan_and_has_no_bounds_below_two_values():
    assert mean_interval([1.0, math.nan, 3.0]).n == 2
    one = mean_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.high) and one.n == 1
    assert mean_interval([]).n == 0 and math.isnan(mean_interval([]).mean)
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 2.0], 1.0)


def test_paired_difference_is_the_interval_of_per_seed_differences_on_shared_seeds():
    a = {0: 0.5, 1: 0.6, 2: 0.55, 3: 0.9, 9: 1.0}
    b = {0: 0.4, 1: 0.45, 2: 0.5, 3: math.nan}
    got = paired_difference(a, b)
    want = mean_interval([0.1, 0.15, 0.05])  # seeds 0-2: seed 3 is NaN in b, seed 9 only in a
    assert (got.mean, got.low, got.high, got.n) == pytest.approx((want.mean, want.low, want.high, want.n))
    # scipy's paired t-test gives the same interval, and it excludes 0 exactly when p < 0.05
    paired = scipy_stats.ttest_rel([0.5, 0.6, 0.55], [0.4, 0.45, 0.5])
    ci = paired.confidence_interval(0.95)
    assert (got.low, got.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert got.excludes_zero() == (paired.pvalue < 0.05)


def test_verdict_reads_the_sign_of_the_interval_and_the_mode():
    above, below, across = Interval(0.1, 0.05, 0.15, 5), Interval(-0.1, -0.15, -0.05, 5), Interval(0, -0.1, 0.1, 5)
    assert [verdict(i) for i in (above, below, across)] == ["better", "worse", "no difference"]
    assert [verdict(i, "min") for i in (above, below)] == ["worse", "better"]
    assert verdict(Interval(0.1, math.nan, math.nan, 1)) == "no difference"
