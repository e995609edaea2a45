"""The ``linefit`` loop: pure pieces (data, loss, fit) and the runner ``metaopt run`` calls."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from example_kind.config import LineFitSection
from metaopt import config
from metaopt.config import Experiment
from metaopt.errors import ConfigError


def make_data(section: LineFitSection) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(section.seed)
    x = rng.standard_normal(section.points)
    return x, section.slope * x + section.noise * rng.standard_normal(section.points)


def squared_error(slope: float, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((slope * x - y) ** 2))


@dataclass(frozen=True)
class Fit:
    slope: float
    loss: float
    steps: int


def fit_slope(x: np.ndarray, y: np.ndarray, lr: float, steps: int) -> Fit:
    """Gradient descent from slope 0 on mean((w x - y)^2), whose gradient is 2 mean(x (w x - y))."""
    slope = 0.0
    for _ in range(steps):
        slope -= lr * 2.0 * float(np.mean(x * (slope * x - y)))
    return Fit(slope, squared_error(slope, x, y), steps)


def run(exp: Experiment[LineFitSection], *, address: str | None = None, verbose: int = 1) -> Fit:
    """The runner: no Ray needed for a problem this small (a real capability builds a Tune Tuner here)."""
    section = exp.section  # typed: LineFitSection
    result = fit_slope(*make_data(section), section.lr, section.steps)
    print(
        f"{exp.name}: slope {result.slope:.6f} after {result.steps} steps, loss {result.loss:.6f} "
        f"(data drawn with slope {section.slope:g})"
    )
    return result


def print_loss(args: argparse.Namespace) -> int:
    """``metaopt linefit-loss FILE --slope S``: the capability's extra verb."""
    exp = config.load(args.file)
    if exp.kind != "linefit":
        raise ConfigError(args.file, f"is a {exp.kind} experiment, not linefit")
    print(f"{squared_error(args.slope, *make_data(exp.section)):.6f}")
    return 0
