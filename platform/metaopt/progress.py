"""Compact terminal progress for any Tune sweep: one line per trial result, exploits and failures called out.

Tune's own reporter prints a config box per trial and a result box per iteration; for a population of
learning-rate trials a line each is easier to follow. ``metaopt run --verbose`` brings Tune's output back.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any

from ray.tune import Callback


class ProgressPrinter(Callback):
    """``[  12.3s] 00001 iter  4/20  val_accuracy 0.9331 (best 0.9501 by 00000)  lr 0.0489``."""

    def __init__(self, metric: str, mode: str, total_iterations: int, out: IO[str] | None = None):
        self.metric = metric
        self.mode = mode
        self.total = total_iterations
        self._out = out  # None: whatever sys.stdout is when a line is printed (the Tuner pickles its callbacks)
        self.started = time.time()
        self.best: tuple[float, str] | None = None
        self.last_lr: dict[str, float] = {}

    def _print(self, text: str) -> None:
        print(f"[{time.time() - self.started:7.1f}s] {text}", file=self._out or sys.stdout, flush=True)

    @staticmethod
    def _short(trial) -> str:
        return str(trial.trial_id).split("_")[-1]

    def _update_best(self, value: float, trial_id: str) -> None:
        if not math.isfinite(value):
            return
        better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
        if better:
            self.best = (value, trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        name = self._short(trial)
        value = float(result.get(self.metric, math.nan))
        self._update_best(value, name)
        lr = result.get("lr")
        note = ""
        if lr is not None and name in self.last_lr and lr != self.last_lr[name]:
            note = f"  <- new lr (was {self.last_lr[name]:.3g})"
        if lr is not None:
            self.last_lr[name] = lr
        if result.get("diverged"):
            note += "  DIVERGED"
        best = f" (best {self.best[0]:.4f} by {self.best[1]})" if self.best else ""
        lr_text = f"  lr {lr:.3g}" if lr is not None else ""
        reached = f"{result.get('training_iteration', 0):>3}/{self.total}"
        self._print(f"{name} iter {reached}  {self.metric} {value:.4f}{best}{lr_text}{note}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(f"{self._short(trial)} FAILED (Tune restarts it from its last checkpoint if max_failures allows)")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(f"{self._short(trial)} crashed; restarting from its last checkpoint")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(f"{self._short(trial)} finished")
