"""The contract every learning problem meets, so any outer loop (PBT, replay, FL) can drive it.

A task owns a model, its optimizer and its data. The outer loop only says *how many*
optimizer steps to take and *which learning rate* each step uses (``lr_at(step)``, a
schedule, :data:`metaopt.optim.Schedule`). The learning rate is written into the
optimizer's state before every step (torch ``param_groups``), never captured in a
closure, so an outer loop may change it at any time (see DESIGN.md, "Optimizer").

A researcher's own problem meets the same contract: ``task: my_pkg.tasks:make_task`` names a factory called as
``make_task(options: dict, optimizer, seed: int)`` exactly like the built-in classes (:mod:`metaopt.tasks`), which
builds its torch optimizer with ``metaopt.optim.build_optimizer(model.parameters(), optimizer)`` and sets
``lr_at(step)`` before each step with ``metaopt.optim.set_learning_rate``; ``examples/own_task`` is a worked one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from metaopt.optim import Schedule


@runtime_checkable
class TrainingTask(Protocol):
    """A learning problem with a resumable training state.

    ``metric``/``mode`` name the score an outer loop optimises (e.g. ``val_accuracy``/``max``; mode is ``min`` or
    ``max``). Every member is required (``isinstance`` checks them all: :func:`metaopt.tasks.checked_task`);
    ``divergence_loss = None`` is a fine value.
    """

    metric: str
    mode: str
    divergence_loss: float | None  # a finite loss above this also counts as diverged (None: only NaN/inf)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (the x-axis of every learning-rate schedule)."""

    def train(self, num_steps: int, lr_at: Schedule) -> dict[str, float]:
        """Take ``num_steps`` optimizer steps, step ``s`` using ``lr_at(s)``; return metrics.

        Metrics include ``self.metric`` and ``loss``; a non-finite loss is reported, not raised.
        """

    def state(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit: weights, optimizer state, step, RNG."""

    def restore(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state`. Learning rates come from the caller's ``lr_at``, not the state."""


def optimizer_steps(
    optimizer: Any, num_steps: int, start_step: int, lr_at: Schedule, next_loss: Callable[[], Any]
) -> tuple[float, int]:
    """The supervised tasks' inner loop: ``num_steps`` optimizer steps at ``lr_at(step)`` on ``next_loss()``.

    Returns (mean loss over ``num_steps``, the step count after). A diverged run (non-finite loss) stops early,
    but its remaining steps are counted as spent so step budgets stay exact.
    """
    from metaopt.optim import set_learning_rate

    step, total = start_step, 0.0
    for done in range(1, num_steps + 1):
        set_learning_rate(optimizer, lr_at(step))
        loss = next_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        total += loss.item()
        if not math.isfinite(total):
            step += num_steps - done
            break
    return total / max(num_steps, 1), step
