"""Intervals of a mean over seeds: what every reproduction table and evaluation summary reports.

Student-t intervals (Student 1908): for n values with mean m and sample standard deviation s, the two-sided
interval at ``level`` is ``m +- t_{(1+level)/2, n-1} * s / sqrt(n)``. A paired comparison of two arms run on the
same seeds is the interval of the mean of the per-seed differences (a paired t-test's interval). Pure: numpy and
scipy only, no Ray, no MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "mean_interval", "paired_difference", "verdict"]


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its two-sided Student-t interval [low, high] (NaN bounds below 2 values)."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        """The interval lies wholly above or below 0 (False when it is undefined)."""
        return (self.low > 0 or self.high < 0) and math.isfinite(self.low) and math.isfinite(self.high)


def mean_interval(values: Iterable[float], level: float = 0.95) -> Interval:
    """Mean of ``values`` and its Student-t interval at ``level``: m +- t_{(1+level)/2, n-1} * s / sqrt(n), s with
    ddof 1. NaN values are dropped first; no value gives a NaN mean, one value NaN bounds."""
    from scipy import stats

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    array = np.asarray(list(values), dtype=float)
    array = array[~np.isnan(array)]
    if array.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(array.mean())
    if array.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + level / 2, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))
    return Interval(mean, mean - half, mean + half, int(array.size))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Interval:
    """Interval of the mean per-seed difference a[s] - b[s] over the seeds both arms have a finite value for
    (a paired t interval; ``a`` and ``b`` map seed -> value)."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    return mean_interval([a[s] - b[s] for s in seeds], level)


def verdict(difference: Interval, mode: str = "max") -> str:
    """``better`` / ``worse`` when the interval of (arm - baseline) excludes 0 (signs flipped for ``mode`` min,
    where lower is better), else ``no difference``."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be max or min, got {mode}")
    if not difference.excludes_zero():
        return "no difference"
    higher = difference.low > 0
    return "better" if higher == (mode == "max") else "worse"
