"""Your own training problem for metaopt: a small torch MLP regressor on this folder's data.csv.

The experiment file names the factory (``task: tasks:make_task``); metaopt imports this module from the folder
you run ``metaopt`` in (and from there in every Ray worker), calls ``make_task(options, optimizer, seed)`` once
to check it before Ray starts, then once per trial. What it returns meets ``metaopt.tasks.TrainingTask``:

- ``metric`` / ``mode``: the score the outer loop (PBT, PB2, a program search) optimises and its direction;
- ``divergence_loss``: a finite loss above it counts as diverged (None: only NaN/inf do);
- ``step``: optimizer steps taken so far, the x-axis of every learning-rate schedule;
- ``train(num_steps, lr_at)``: take ``num_steps`` steps, step ``s`` at learning rate ``lr_at(s)``; return metrics
  including ``metric`` and ``loss``;
- ``state()`` / ``restore(state)``: everything needed to resume bit-for-bit (weights, optimizer, step, RNG), so
  PBT can copy a good trial into a bad one.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metaopt.optim import build_optimizer, set_learning_rate

DEFAULTS = {"hidden": 32, "batch_size": 32, "val_fraction": 0.25, "split_seed": 0, "data": "data.csv"}


def make_task(options: dict[str, Any], optimizer: Any, seed: int) -> RegressionTask:
    """The factory metaopt calls: ``options`` is the experiment's ``task_options`` mapping, ``optimizer`` the
    validated metaopt.optim spec (``{name: sgd, momentum: 0.9}`` in pbt.yaml), ``seed`` the trial's seed."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown task option(s) {', '.join(unknown)}; allowed: {', '.join(DEFAULTS)}")
    return RegressionTask({**DEFAULTS, **options}, optimizer, seed)


@functools.lru_cache(maxsize=2)
def load_splits(data: str, val_fraction: float, split_seed: int) -> dict[str, torch.Tensor]:
    """The CSV (last column the target; a relative path is next to this file) split into train and validation."""
    path = Path(__file__).with_name(data) if not Path(data).is_absolute() else Path(data)
    table = torch.tensor(np.loadtxt(path, delimiter=",", skiprows=1), dtype=torch.float32)
    order = torch.tensor(np.random.default_rng(split_seed).permutation(len(table)))
    n_val = int(len(table) * val_fraction)
    val, train = table[order[:n_val]], table[order[n_val:]]
    return {"x_train": train[:, :-1], "y_train": train[:, -1:], "x_val": val[:, :-1], "y_val": val[:, -1:]}


class RegressionTask:
    """An MLP fitting y from x by mean squared error; the score is the validation MSE (lower is better)."""

    metric = "val_mse"
    mode = "min"

    def __init__(self, options: dict[str, Any], optimizer: Any, seed: int):
        self.batch_size = int(options["batch_size"])
        self.data = load_splits(str(options["data"]), float(options["val_fraction"]), int(options["split_seed"]))
        torch.manual_seed(seed)
        features, hidden = self.data["x_train"].shape[1], int(options["hidden"])
        self.model = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.model.append(nn.Linear(hidden, 1))
        # The learning rate is metaopt's: it is written into the optimizer before every step (set_learning_rate).
        self.optimizer = build_optimizer(self.model.parameters(), optimizer)
        self.batches = torch.Generator().manual_seed(seed)  # minibatch order: part of the state
        self._step = 0
        self.divergence_loss = 10.0 * self.evaluate()["val_mse"]  # far above the untrained model's error

    @property
    def step(self) -> int:
        return self._step

    def train(self, num_steps: int, lr_at) -> dict[str, float]:
        self.model.train()
        total = 0.0
        for _ in range(num_steps):
            set_learning_rate(self.optimizer, lr_at(self._step))
            index = torch.randint(len(self.data["y_train"]), (self.batch_size,), generator=self.batches)
            loss = nn.functional.mse_loss(self.model(self.data["x_train"][index]), self.data["y_train"][index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self._step += 1
            total += loss.item()
        return {"loss": total / max(num_steps, 1), **self.evaluate()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        return {"val_mse": nn.functional.mse_loss(self.model(self.data["x_val"]), self.data["y_val"]).item()}

    def state(self) -> dict[str, Any]:
        # Copies: a state must not change as training goes on.
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step": self._step,
            "batches": self.batches.get_state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._step = int(state["step"])
        self.batches.set_state(state["batches"])
