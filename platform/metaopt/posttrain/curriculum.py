"""Curricula over categories: which task/difficulty the next prompts come from.

Categories are indices ``0..K-1`` into :attr:`metaopt.posttrain.tasks.TaskSet.categories`, ordered easy -> hard.
Every curriculum has the same small interface, so the training loop takes any of them as an argument:

* ``probabilities() -> np.ndarray`` — the current distribution over categories;
* ``sample(rng, n) -> np.ndarray[int]`` — ``n`` category indices drawn from it with ``rng``;
* ``update(category_rewards: dict[int, float])`` — feedback after a step (only SEC uses it);
* ``advance(step, total_steps)`` — training progress (only the ordered schedules use it);
* ``state_dict()`` / ``load_state_dict(state)`` — plain JSON-serialisable state for checkpoints.

:class:`SEC` is the Self-Evolving Curriculum of Chen et al. 2025, "Self-Evolving Curriculum for LLM Reasoning":
each category is an arm of a non-stationary bandit whose reward is the mean absolute GRPO advantage of its
rollouts (:func:`category_rewards`). With 0/1 rewards a group's E|Â| is largest at 50% success, so SEC
drifts to the categories at the frontier of what the policy can learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from metaopt.errors import ConfigError

__all__ = [
    "CURRICULUM_NAMES",
    "SEC",
    "EasyToHard",
    "HardToEasy",
    "Uniform",
    "category_rewards",
    "make_curriculum",
]

CURRICULUM_NAMES = ("sec", "uniform", "easy_to_hard", "hard_to_easy")


def category_rewards(
    prompt_categories: Sequence[int], advantages: torch.Tensor | np.ndarray, group_size: int
) -> dict[int, float]:
    """SEC's learning-gain reward per category: the mean |Â| over all rollouts of its prompts in the batch.

    ``prompt_categories[i]`` is the category of prompt ``i``; ``advantages`` has one entry per rollout, grouped
    as rows ``i*G .. i*G+G-1`` for prompt ``i`` (the :func:`metaopt.posttrain.grpo.group_advantages` layout).
    Chen et al. 2025: r(c) = mean over the problems of category c of mean_i |Â_i|.
    """
    magnitudes = np.abs(np.asarray(torch.as_tensor(advantages).detach().cpu(), dtype=np.float64))
    magnitudes = magnitudes.reshape(len(prompt_categories), group_size).mean(axis=1)
    totals: dict[int, list[float]] = {}
    for category, value in zip(prompt_categories, magnitudes):
        totals.setdefault(int(category), []).append(float(value))
    return {category: float(np.mean(values)) for category, values in totals.items()}


class _Curriculum:
    name = ""

    def __init__(self, num_categories: int):
        self.num_categories = num_categories

    def probabilities(self) -> np.ndarray:
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` category indices drawn i.i.d. from :meth:`probabilities`."""
        return rng.choice(self.num_categories, size=n, p=self.probabilities())

    def update(self, category_rewards: dict[int, float]) -> None:
        """Feedback after a training step; a fixed schedule ignores it."""

    def advance(self, step: int, total_steps: int) -> None:
        """Training progress; a curriculum that does not follow progress ignores it."""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_categories": self.num_categories}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name or state.get("num_categories") != self.num_categories:
            raise ValueError(
                f"state of curriculum {state.get('name')!r} over {state.get('num_categories')} categories "
                f"does not fit {self.name!r} over {self.num_categories}"
            )


class Uniform(_Curriculum):
    """Every category with probability 1/K at every step (the "random" baseline of Chen et al. 2025)."""

    name = "uniform"

    def probabilities(self) -> np.ndarray:
        return np.full(self.num_categories, 1.0 / self.num_categories)


class SEC(_Curriculum):
    """Self-Evolving Curriculum (Chen et al. 2025): a Boltzmann bandit over categories with TD(0) values.

    * Values start at Q(c) = 0 for every category.
    * Sampling: p(c) = exp(Q(c)/τ) / Σ_c' exp(Q(c')/τ). Large τ -> uniform; small τ -> greedy.
    * Update (TD(0) with a constant step for a non-stationary reward): for each category c seen in the
      batch, Q(c) <- α·r(c) + (1 − α)·Q(c), with r(c) the mean |Â| of its rollouts (:func:`category_rewards`);
      categories not in the batch keep their value.
    """

    name = "sec"

    def __init__(self, num_categories: int, alpha: float = 0.5, tau: float = 1.0):
        super().__init__(num_categories)
        self.alpha = alpha
        self.tau = tau
        self.q = np.zeros(num_categories)

    def probabilities(self) -> np.ndarray:
        logits = self.q / self.tau
        weights = np.exp(logits - logits.max())  # shift for stability; the softmax is unchanged
        return weights / weights.sum()

    def update(self, category_rewards: dict[int, float]) -> None:
        for category, reward in category_rewards.items():
            if not 0 <= category < self.num_categories:
                raise IndexError(f"category {category} outside 0..{self.num_categories - 1}")
            self.q[category] = self.alpha * reward + (1.0 - self.alpha) * self.q[category]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha, "tau": self.tau, "q": self.q.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.alpha, self.tau = float(state["alpha"]), float(state["tau"])
        self.q = np.asarray(state["q"], dtype=np.float64)


class EasyToHard(_Curriculum):
    """A window of categories sliding from the easiest to the hardest as training progresses.

    Categories are put in difficulty order: by ``difficulties`` when given (a level per category; ties keep
    index order, so several tasks interleave level by level), else by index (the task set's order, easy ->
    hard within each task). With progress x = clip(step / total_steps, 0, 1) and K categories, the *front* is
    position f = min(floor(x·K), K − 1) of that order: each category is the front for an equal 1/K share of
    training. The categories at positions ``max(0, f − window + 1) .. f`` are sampled uniformly; all others
    have probability 0. ``window=1`` is the plain ordered curriculum of Chen et al. 2025; ``window=K`` grows a
    uniform mix over everything seen so far.
    """

    name = "easy_to_hard"

    def __init__(self, num_categories: int, window: int = 1, difficulties: Sequence[int] | None = None):
        super().__init__(num_categories)
        if difficulties is not None and len(difficulties) != num_categories:
            raise ConfigError("posttrain.curriculum.difficulties", f"needs {num_categories} levels, got {len(difficulties)}")
        self.window = window
        self.order = list(range(num_categories)) if difficulties is None else [
            int(i) for i in np.argsort(np.asarray(difficulties), kind="stable")
        ]
        self.progress = 0.0

    def _ordered_probabilities(self) -> np.ndarray:
        """Probabilities by position in the easy -> hard order."""
        front = min(int(self.progress * self.num_categories), self.num_categories - 1)
        probs = np.zeros(self.num_categories)
        start = max(0, front - self.window + 1)
        probs[start:front + 1] = 1.0 / (front + 1 - start)
        return probs

    def probabilities(self) -> np.ndarray:
        probs = np.zeros(self.num_categories)
        probs[self.order] = self._ordered_probabilities()
        return probs

    def advance(self, step: int, total_steps: int) -> None:
        self.progress = min(max(step / max(total_steps, 1), 0.0), 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "window": self.window, "order": self.order, "progress": self.progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.window, self.progress = int(state["window"]), float(state["progress"])
        self.order = [int(i) for i in state["order"]]


class HardToEasy(EasyToHard):
    """:class:`EasyToHard` run backwards: the window starts at the hardest category and slides to the easiest."""

    name = "hard_to_easy"

    def probabilities(self) -> np.ndarray:
        probs = np.zeros(self.num_categories)
        probs[self.order] = self._ordered_probabilities()[::-1]
        return probs


_CLASSES: dict[str, type[_Curriculum]] = {
    "sec": SEC, "uniform": Uniform, "easy_to_hard": EasyToHard, "hard_to_easy": HardToEasy,
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "sec": ("alpha", "tau"), "uniform": (),
    "easy_to_hard": ("window", "difficulties"), "hard_to_easy": ("window", "difficulties"),
}


def _check_options(name: str, num_categories: int, options: dict[str, Any]) -> dict[str, Any]:
    allowed = _OPTIONS[name]
    for key in options:
        if key not in allowed:
            listed = ", ".join(allowed) if allowed else "none"
            raise ConfigError(f"posttrain.curriculum.{key}", f"not an option of curriculum {name!r}; options: {listed}")
    for key, value in options.items():
        number_ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
        if key == "alpha" and not (number_ok and 0 < value <= 1):
            raise ConfigError("posttrain.curriculum.alpha", f"must be a number in (0, 1], got {value!r}")
        if key == "tau" and not (number_ok and value > 0):
            raise ConfigError("posttrain.curriculum.tau", f"must be a number > 0, got {value!r}")
        if key == "window" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError("posttrain.curriculum.window", f"must be an integer >= 1, got {value!r}")
        if key == "difficulties" and not (
            isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise ConfigError("posttrain.curriculum.difficulties", f"must be a list of integer levels, got {value!r}")
    return options


def make_curriculum(name: str, num_categories: int, **options: Any) -> _Curriculum:
    """A curriculum by name (:data:`CURRICULUM_NAMES`): ``sec`` (``alpha`` 0.5, ``tau`` 1.0), ``uniform``,
    ``easy_to_hard`` / ``hard_to_easy`` (``window`` 1, ``difficulties`` None: index order; pass
    ``[taskset.difficulty(c) for c in taskset.categories]`` to order several tasks by level)."""
    if name not in _CLASSES:
        raise ConfigError("posttrain.curriculum.name", f"unknown curriculum {name!r}; known: {', '.join(CURRICULUM_NAMES)}")
    if not isinstance(num_categories, int) or num_categories < 1:
        raise ConfigError("posttrain.tasks", f"need at least one category, got {num_categories!r}")
    return _CLASSES[name](num_categories, **_check_options(name, num_categories, options))
