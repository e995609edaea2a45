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

Each curriculum's options are a pydantic model chosen by ``name`` (:data:`CURRICULA`, the one list of curriculum
names, which the ``posttrain:`` section validates against). Options given as keywords or a mapping are validated
on the way in (one ConfigError naming ``posttrain.curriculum.<option>``); a curriculum then trusts them. This
module imports numpy only, so the section can use its models without torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import ConfigDict, Field, Strict

from metaopt.errors import ConfigError
from metaopt.optim.specs import NamedSpec, NamedSpecs, Number, literal_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "CURRICULA",
    "CURRICULUM_NAMES",
    "SEC",
    "CurriculumOptions",
    "EasyToHard",
    "EasyToHardOptions",
    "HardToEasy",
    "HardToEasyOptions",
    "SECAlpha",
    "SECOptions",
    "SECTau",
    "Uniform",
    "UniformOptions",
    "category_rewards",
    "curriculum_options",
    "make_curriculum",
]

#: SEC's TD(0) step size alpha: in (0, 1] (1 keeps only the latest reward).
SECAlpha = Annotated[Number, Field(gt=0, le=1)]
#: SEC's Boltzmann temperature tau: > 0 (large: uniform; small: greedy).
SECTau = Annotated[Number, Field(gt=0)]


class CurriculumOptions(NamedSpec):
    """A curriculum's options; a subclass per curriculum fixes ``name``."""

    model_config = ConfigDict(frozen=True)


class SECOptions(CurriculumOptions):
    """Self-Evolving Curriculum (Chen et al. 2025): TD(0) values, Boltzmann sampling."""

    name: Literal["sec"] = "sec"
    alpha: SECAlpha = Field(default=0.5, description="TD(0) learning rate of the category values.")
    tau: SECTau = Field(default=1.0, description="Boltzmann temperature over category values.")


class UniformOptions(CurriculumOptions):
    """Every category with probability 1/K (no options)."""

    name: Literal["uniform"] = "uniform"


class OrderedOptions(CurriculumOptions):
    """A window sliding over the categories in difficulty order."""

    window: Annotated[int, Strict()] = Field(default=1, ge=1, description="Categories sampled at once.")
    difficulties: tuple[Annotated[int, Strict()], ...] | None = Field(
        default=None, description="A level per category to order by (None: index order, easy -> hard)."
    )


class EasyToHardOptions(OrderedOptions):
    name: Literal["easy_to_hard"] = "easy_to_hard"


class HardToEasyOptions(OrderedOptions):
    name: Literal["hard_to_easy"] = "hard_to_easy"


#: The curricula: name -> options model. The one list of curriculum names.
CURRICULA: NamedSpecs[CurriculumOptions] = NamedSpecs("posttrain.curriculum")
for _model in (SECOptions, UniformOptions, EasyToHardOptions, HardToEasyOptions):
    CURRICULA.register(literal_name(_model), _model)
CURRICULUM_NAMES = CURRICULA.names()


def curriculum_options(spec: CurriculumOptions | Mapping[str, Any] | str, **options: Any) -> CurriculumOptions:
    """The validated options of a curriculum given as a model, a mapping with a ``name``, or a name (plus
    ``options``); anything bad is one ConfigError naming ``posttrain.curriculum.<option>``."""
    if isinstance(spec, str):
        spec = {"name": spec}
    elif isinstance(spec, CurriculumOptions) and options:
        spec = {**spec.model_dump(exclude_unset=True), "name": spec.name}
    return CURRICULA.parse({**spec, **options} if isinstance(spec, Mapping) else spec)


def category_rewards(
    prompt_categories: Sequence[int], advantages: torch.Tensor | np.ndarray, group_size: int
) -> dict[int, float]:
    """SEC's learning-gain reward per category: the mean |Â| over all rollouts of its prompts in the batch.

    ``prompt_categories[i]`` is the category of prompt ``i``; ``advantages`` has one entry per rollout, grouped
    as rows ``i*G .. i*G+G-1`` for prompt ``i`` (the :func:`metaopt.posttrain.grpo.group_advantages` layout).
    Chen et al. 2025: r(c) = mean over the problems of category c of mean_i |Â_i|.
    """
    if hasattr(advantages, "detach"):  # a torch tensor (this module does not import torch)
        advantages = advantages.detach().cpu()
    magnitudes = np.abs(np.asarray(advantages, dtype=np.float64))
    magnitudes = magnitudes.reshape(len(prompt_categories), group_size).mean(axis=1)
    totals: dict[int, list[float]] = {}
    for category, value in zip(prompt_categories, magnitudes):
        totals.setdefault(int(category), []).append(float(value))
    return {category: float(np.mean(values)) for category, values in totals.items()}


class _Curriculum:
    """A curriculum over ``num_categories`` categories with its validated ``options``."""

    name: ClassVar[str] = ""

    def __init__(
        self, num_categories: int, options: CurriculumOptions | Mapping[str, Any] | None = None, **settings: Any
    ):
        if isinstance(options, Mapping) or options is None:
            options = {"name": self.name, **(options or {})}
        self.options = curriculum_options(options, **settings)
        if self.options.name != self.name:
            raise TypeError(f"{type(self).__name__} runs {self.name!r} options, not {self.options.name!r}")
        if isinstance(num_categories, bool) or not isinstance(num_categories, int) or num_categories < 1:
            raise ConfigError("posttrain.tasks", f"need at least one category, got {num_categories!r}")
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
    options: UniformOptions

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
    options: SECOptions

    def __init__(self, num_categories: int, options: SECOptions | Mapping[str, Any] | None = None, **settings: Any):
        super().__init__(num_categories, options, **settings)
        self.alpha = self.options.alpha
        self.tau = self.options.tau
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
    options: OrderedOptions

    def __init__(self, num_categories: int, options: OrderedOptions | Mapping[str, Any] | None = None, **settings: Any):
        super().__init__(num_categories, options, **settings)
        difficulties = self.options.difficulties
        if difficulties is not None and len(difficulties) != num_categories:
            raise ConfigError(
                "posttrain.curriculum.difficulties", f"needs {num_categories} levels, got {len(difficulties)}"
            )
        self.window = self.options.window
        self.order = (
            list(range(num_categories))
            if difficulties is None
            else [int(i) for i in np.argsort(np.asarray(difficulties), kind="stable")]
        )
        self.progress = 0.0

    def _ordered_probabilities(self) -> np.ndarray:
        """Probabilities by position in the easy -> hard order."""
        front = min(int(self.progress * self.num_categories), self.num_categories - 1)
        probs = np.zeros(self.num_categories)
        start = max(0, front - self.window + 1)
        probs[start : front + 1] = 1.0 / (front + 1 - start)
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


_CLASSES: dict[str, type[_Curriculum]] = {cls.name: cls for cls in (SEC, Uniform, EasyToHard, HardToEasy)}


def make_curriculum(
    spec: CurriculumOptions | Mapping[str, Any] | str, num_categories: int, **options: Any
) -> _Curriculum:
    """A curriculum by name (:data:`CURRICULUM_NAMES`), mapping or options model: ``sec`` (``alpha`` 0.5, ``tau``
    1.0), ``uniform``, ``easy_to_hard`` / ``hard_to_easy`` (``window`` 1, ``difficulties`` None: index order; pass
    ``[taskset.difficulty(c) for c in taskset.categories]`` to order several tasks by level)."""
    validated = curriculum_options(spec, **options)
    return _CLASSES[validated.name](num_categories, validated)
