"""A torch MLP classifier on scikit-learn's 8x8 digits (1,797 images shipped inside scikit-learn).

Small enough that a population trains on 2 CPUs in seconds, real enough that the learning rate matters:
too small and it underfits within the budget, too large and SGD diverges. Splits are fixed by
``split_seed`` so every trial and every replay sees the same train/validation/test images; the minibatch
order comes from a torch generator that is part of the training state, so a run resumes bit-for-bit.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np
import torch
from torch import nn

from metaopt.errors import ConfigError
from metaopt.optim import Schedule, build_optimizer
from metaopt.tasks.base import optimizer_steps
from metaopt.tasks.datasets import digits_tensors
from metaopt.tasks.options import DigitsOptions

OPTIONS_FIELD = "pbt.task_options"  # what errors name when the task is built outside a section


@functools.lru_cache(maxsize=4)
def load_digits_splits(split_seed: int, val_fraction: float, test_fraction: float) -> dict[str, torch.Tensor]:
    """Features scaled to [0, 1]; a stratification-free fixed permutation split into train/val/test."""
    x, y = digits_tensors()
    order = torch.tensor(np.random.default_rng(split_seed).permutation(len(y)))
    n_val, n_test = int(len(y) * val_fraction), int(len(y) * test_fraction)
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    return {
        "x_train": x[train],
        "y_train": y[train],
        "x_val": x[val],
        "y_val": y[val],
        "x_test": x[test],
        "y_test": y[test],
    }


def build_mlp(in_features: int, hidden: tuple[int, ...], classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def pick_device(choice: str) -> torch.device:
    """``auto``: CUDA when this process sees a GPU (Ray sets CUDA_VISIBLE_DEVICES per trial), else CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("pbt.task_options.device", "cuda requested but torch sees no GPU in this trial")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


class DigitsTask:
    """TrainingTask: MLP on digits; score = validation accuracy (higher is better)."""

    metric = "val_accuracy"
    mode = "max"

    def __init__(self, options: dict[str, Any] | DigitsOptions, optimizer: Any, seed: int):
        from metaopt.tasks import parse_task_options

        self.options = parse_task_options("digits", options, OPTIONS_FIELD)
        self.device = pick_device(self.options.device)
        splits = load_digits_splits(self.options.split_seed, self.options.val_fraction, self.options.test_fraction)
        self.data = {name: tensor.to(self.device) for name, tensor in splits.items()}
        torch.manual_seed(seed)
        self.model = build_mlp(64, self.options.hidden, 10).to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), optimizer)
        self.batch_order = torch.Generator().manual_seed(seed)
        self._step = 0
        self._epoch_order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        # Cross-entropy far above its value at initialisation means SGD blew up even if it stayed finite.
        self.divergence_loss = 10.0 * self.evaluate("val")["val_loss"]

    @property
    def step(self) -> int:
        return self._step

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.data["y_train"])
        if self._cursor + self.options.batch_size > len(self._epoch_order):
            self._epoch_order = torch.randperm(n, generator=self.batch_order)
            self._cursor = 0
        idx = self._epoch_order[self._cursor : self._cursor + self.options.batch_size].to(self.device)
        self._cursor += self.options.batch_size
        return self.data["x_train"][idx], self.data["y_train"][idx]

    def train(self, num_steps: int, lr_at: Schedule) -> dict[str, float]:
        self.model.train()

        def next_loss():
            x, y = self._next_batch()
            return nn.functional.cross_entropy(self.model(x), y)

        loss, self._step = optimizer_steps(self.optimizer, num_steps, self._step, lr_at, next_loss)
        return {"loss": loss, **self.evaluate("val")}

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict[str, float]:
        self.model.eval()
        logits = self.model(self.data[f"x_{split}"])
        y = self.data[f"y_{split}"]
        return {
            f"{split}_loss": nn.functional.cross_entropy(logits, y).item(),
            f"{split}_accuracy": (logits.argmax(-1) == y).float().mean().item(),
        }

    def state(self) -> dict[str, Any]:
        # Deep copies: torch state dicts alias the live tensors, and a state must not change as training goes on.
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step": self._step,
            "batch_order": self.batch_order.get_state(),
            "epoch_order": self._epoch_order.clone(),
            "cursor": self._cursor,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._step = int(state["step"])
        self.batch_order.set_state(state["batch_order"])
        self._epoch_order = state["epoch_order"].clone()
        self._cursor = int(state["cursor"])

    def close(self) -> None:
        pass
