"""Verifiable tasks with difficulty levels: the categories a curriculum chooses between.

A *category* is one task at one difficulty level, named ``"<task>/L<level>"`` (``"arithmetic/L1"``). A
problem is a short prompt a character-level policy can learn, ``"Q:<question> A:"``; its target completion is
the answer text followed by ``<eos>`` (e.g. ``"Q:3+4 A:"`` -> ``"7"``). Rewards are verifiable and binary:
the completion is cut at the first end-of-sequence marker or newline and stripped, then checked — 1.0 if
correct, else 0.0 (the verifiable 0/1 rewards SEC is designed around, Chen et al. 2025).

Tasks (:data:`TASK_NAMES`):

* ``arithmetic`` — our own generator, levels 1–5 (:data:`ARITHMETIC_LEVELS`).
* ``basic_arithmetic``, ``chain_sum``, ``products``, ``countdown`` — reasoning-gym generators
  (``reasoning_gym.create_dataset(name, size, seed, **level_kwargs)``); the level picks the generator's
  difficulty arguments (:data:`GYM_LEVELS`), the long question is rewritten into the short form above, and
  the reward is reasoning-gym's own ``dataset.score_answer(answer, entry)``, counted as correct only at
  full score (reasoning-gym gives small partial credit for well-formed wrong answers) -- except ``countdown``.

Model-written text is never evaluated: reasoning-gym's countdown scorer runs the completion through sympy's
``parse_expr`` (Python ``eval``), so countdown answers are scored by
:func:`metaopt.posttrain.arithmetic.score_countdown`, a bounded exact evaluator with reasoning-gym's rules.
The other three scorers only compare strings (``basic_arithmetic``) or ``Decimal`` values (``chain_sum``,
``products``); answers longer than :data:`~metaopt.posttrain.arithmetic.MAX_CHARS` score 0 before any scorer
sees them.

Which tasks exist and which levels each has is :data:`TASK_LEVELS` (the one list of task names); a task set is
validated by :class:`TaskSpec` models (the ``posttrain:`` section's ``tasks`` use them too), so a bad name or
level is one ConfigError naming ``posttrain.tasks.<i>.<field>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, Field, Strict, ValidationError, model_validator

from metaopt.config import StrictModel, first_error, quote
from metaopt.errors import ConfigError
from metaopt.posttrain.arithmetic import MAX_CHARS, score_countdown

__all__ = [
    "ARITHMETIC_LEVELS",
    "GYM_LEVELS",
    "TASK_LEVELS",
    "TASK_NAMES",
    "Levels",
    "Problem",
    "TaskList",
    "TaskSet",
    "TaskSpec",
    "each_task_once",
    "format_prompt",
    "make_taskset",
    "parse_completion",
]

END_MARKERS = ("<eos>", "\n")


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer; ``entry`` is the reasoning-gym item (None for our own tasks)."""

    prompt: str
    answer: str
    category: str
    entry: dict | None = None


def format_prompt(question: str) -> str:
    """The one prompt format every task uses: short, so tiny CPU policies stay fast."""
    return f"Q:{question} A:"


def parse_completion(text: str) -> str:
    """The answer in a completion: the text before the first ``<eos>`` or newline, stripped."""
    for marker in END_MARKERS:
        text = text.split(marker, 1)[0]
    return text.strip()


# ---------------------------------------------------------------------------
# Our own arithmetic: each level is a function rng -> (question, answer).
# ---------------------------------------------------------------------------


def _evaluate(numbers: list[int], operators: list[str]) -> int:
    """``n0 op0 n1 op1 n2 ...`` with the usual precedence (* before + and -), without ``eval``."""
    terms, signs = [numbers[0]], []
    for op, number in zip(operators, numbers[1:]):
        if op == "*":
            terms[-1] *= number
        else:
            terms.append(number)
            signs.append(1 if op == "+" else -1)
    return terms[0] + sum(sign * term for sign, term in zip(signs, terms[1:]))


def _expression(rng: np.random.Generator, highs: list[int], operators: str) -> tuple[str, str]:
    numbers = [int(rng.integers(0, high + 1)) for high in highs]
    ops = [str(rng.choice(list(operators))) for _ in numbers[1:]]
    question = str(numbers[0]) + "".join(op + str(n) for op, n in zip(ops, numbers[1:]))
    return question, str(_evaluate(numbers, ops))


def _level_1(rng):  # a+b, one digit each: 100 problems, answers 0..18
    return _expression(rng, [9, 9], "+")


def _level_2(rng):  # a+b or a-b, up to two digits each (negative results possible)
    return _expression(rng, [99, 99], "+-")


def _level_3(rng):  # three terms joined by + or -, up to two digits each
    return _expression(rng, [99, 99, 99], "+-")


def _level_4(rng):  # a*b, two digits times one digit
    return _expression(rng, [99, 9], "*")


def _level_5(rng):  # three terms with +, - and * (precedence matters), up to two digits each
    return _expression(rng, [99, 99, 99], "+-*")


ARITHMETIC_LEVELS: dict[int, Callable[[np.random.Generator], tuple[str, str]]] = {
    1: _level_1,
    2: _level_2,
    3: _level_3,
    4: _level_4,
    5: _level_5,
}


# ---------------------------------------------------------------------------
# reasoning-gym generators: per-level create_dataset kwargs and a short question form.
# ---------------------------------------------------------------------------


def _terms_digits(terms: tuple[int, int], digits: tuple[int, int], **extra: Any) -> dict[str, Any]:
    return {"min_terms": terms[0], "max_terms": terms[1], "min_digits": digits[0], "max_digits": digits[1], **extra}


def _countdown(numbers: int, value: int, target: tuple[int, int]) -> dict[str, Any]:
    return {
        "min_numbers": numbers,
        "max_numbers": numbers,
        "min_value": 1,
        "max_value": value,
        "min_target": target[0],
        "max_target": target[1],
    }


_PLAIN = {"allow_parentheses": False, "allow_negation": False}
GYM_LEVELS: dict[str, dict[int, dict[str, Any]]] = {
    "basic_arithmetic": {
        1: _terms_digits((2, 2), (1, 1), operators=("+", "-"), **_PLAIN),
        2: _terms_digits((2, 2), (2, 2), operators=("+", "-"), **_PLAIN),
        3: _terms_digits((3, 3), (1, 2), operators=("+", "-", "*"), **_PLAIN),
        4: _terms_digits((3, 4), (2, 2), operators=("+", "-", "*"), allow_parentheses=True, allow_negation=False),
    },
    "chain_sum": {
        1: _terms_digits((2, 2), (1, 1)),
        2: _terms_digits((2, 2), (2, 2)),
        3: _terms_digits((3, 3), (1, 1)),
        4: _terms_digits((3, 3), (2, 2)),
        5: _terms_digits((4, 5), (2, 3)),
    },
    "products": {
        1: _terms_digits((2, 2), (1, 1)),
        2: _terms_digits((2, 2), (1, 2)),
        3: _terms_digits((2, 2), (2, 2)),
    },
    "countdown": {
        1: _countdown(2, 9, (1, 20)),
        2: _countdown(3, 9, (10, 50)),
        3: _countdown(4, 25, (20, 200)),
    },
}

#: task name -> its difficulty levels (1 = easiest): the one list of task names, ours first.
TASK_LEVELS: dict[str, tuple[int, ...]] = {
    "arithmetic": tuple(ARITHMETIC_LEVELS),
    **{task: tuple(levels) for task, levels in GYM_LEVELS.items()},
}
TASK_NAMES = tuple(TASK_LEVELS)
_GYM_SIZE = 1_000_000  # procedural datasets build item i on demand from seed + i, so size costs nothing


def _short_question(task: str, entry: dict) -> str:
    metadata = entry["metadata"]
    if task == "countdown":  # "make <target> from <numbers>"; answer: an expression using each number once
        return f"{metadata['target']} from {','.join(map(str, metadata['numbers']))}"
    return metadata["expression"].replace(" ", "")


class _ArithmeticSource:
    def __init__(self, level: int):
        self.generate = ARITHMETIC_LEVELS[level]

    def sample(self, rng: np.random.Generator) -> tuple[str, str, dict | None]:
        question, answer = self.generate(rng)
        return question, answer, None

    def score(self, answer: str, problem: Problem) -> float:
        return float(answer == problem.answer)


class _GymSource:
    def __init__(self, task: str, level: int, seed: int):
        import reasoning_gym  # only reasoning-gym tasks need it: our own arithmetic runs without it

        self.task = task
        self.dataset = reasoning_gym.create_dataset(task, size=_GYM_SIZE, seed=seed, **GYM_LEVELS[task][level])

    def sample(self, rng: np.random.Generator) -> tuple[str, str, dict | None]:
        entry = self.dataset[int(rng.integers(len(self.dataset)))]
        return _short_question(self.task, entry), entry["answer"].replace(" ", ""), entry

    def score(self, answer: str, problem: Problem) -> float:
        """Full score or nothing; countdown through our safe evaluator, never reasoning-gym's sympy ``eval``."""
        if len(answer) > MAX_CHARS:  # no correct answer is this long; keeps every scorer's work bounded
            return 0.0
        assert problem.entry is not None, "a reasoning-gym problem carries its entry"
        if self.task == "countdown":
            metadata = problem.entry["metadata"]
            return score_countdown(answer, metadata["numbers"], metadata["target"])
        return float(self.dataset.score_answer(answer, problem.entry) >= 1.0)


def _known_task(name: str) -> str:
    if name not in TASK_LEVELS:
        raise ValueError(f"unknown task {quote(name)}; allowed: {', '.join(TASK_NAMES)}")
    return name


#: Difficulty levels as written: integers (1 = easiest).
Levels = list[Annotated[int, Strict()]]


class TaskSpec(StrictModel):
    """A task and the difficulty levels used as curriculum categories (task x level)."""

    name: Annotated[str, AfterValidator(_known_task)] = Field(
        description="arithmetic (ours) or a reasoning-gym generator (basic_arithmetic, chain_sum, products, countdown)."
    )
    levels: Levels | None = Field(
        default=None, min_length=1, description="Difficulty levels (None: every level of the task)."
    )

    @model_validator(mode="after")
    def _levels_of_the_task(self) -> TaskSpec:
        known = TASK_LEVELS[self.name]
        for level in self.levels or ():
            if level not in known:
                raise ConfigError("levels", f"task {quote(self.name)} has no level {level}; levels: {list(known)}")
        if self.levels is not None and len(set(self.levels)) != len(self.levels):
            raise ConfigError("levels", f"each level once (got {self.levels})")
        return self

    @property
    def all_levels(self) -> list[int]:
        """The levels used, easy -> hard."""
        return sorted(self.levels) if self.levels is not None else list(TASK_LEVELS[self.name])


def each_task_once(tasks: list[TaskSpec]) -> list[TaskSpec]:
    """Each task in one entry (its levels together), so categories are distinct; a ConfigError on the repeat."""
    names = [task.name for task in tasks]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(str(i), f"task {quote(name)} is listed twice; give all its levels in one entry")
    return tasks


#: The tasks of a run: at least one, each task once.
TaskList = Annotated[list[TaskSpec], Field(min_length=1), AfterValidator(each_task_once)]


class _TaskSetSpec(StrictModel):
    tasks: TaskList


def task_specs(tasks: Sequence[TaskSpec | dict[str, Any]]) -> list[TaskSpec]:
    """``tasks`` (models, or mappings as written in YAML) validated; one ConfigError naming
    ``posttrain.tasks.<i>.<field>`` otherwise."""
    try:
        return _TaskSetSpec.model_validate({"tasks": tasks}).tasks
    except ValidationError as err:
        raise first_error("posttrain", _TaskSetSpec, err) from None


class TaskSet:
    """The categories of a run, easy -> hard within each task, tasks in the order given.

    ``tasks``: :class:`TaskSpec` models or mappings (``[{"name": "arithmetic", "levels": [1, 2, 3]}, ...]``),
    validated here. Sampling is driven only by the ``rng`` passed in, so a run that seeds its generator is
    reproducible.
    """

    def __init__(self, tasks: Sequence[TaskSpec | dict[str, Any]], seed: int):
        self.categories: list[str] = []
        self._levels: dict[str, int] = {}
        self._sources: dict[str, _ArithmeticSource | _GymSource] = {}
        for task_index, spec in enumerate(task_specs(tasks)):
            task = spec.name
            for level in spec.all_levels:
                category = f"{task}/L{level}"
                source: _ArithmeticSource | _GymSource
                if task == "arithmetic":
                    source = _ArithmeticSource(level)
                else:  # a distinct dataset seed per (run seed, task, level)
                    dataset_seed = int(np.random.SeedSequence([seed, task_index, level]).generate_state(1)[0])
                    source = _GymSource(task, level, dataset_seed)
                self.categories.append(category)
                self._levels[category] = level
                self._sources[category] = source

    def _source(self, category: str) -> _ArithmeticSource | _GymSource:
        if category not in self._sources:
            raise KeyError(f"unknown category {category!r}; this task set has {', '.join(self.categories)}")
        return self._sources[category]

    def difficulty(self, category: str) -> int:
        """The category's level (1 = easiest)."""
        self._source(category)
        return self._levels[category]

    def sample(self, category: str, rng: np.random.Generator) -> Problem:
        question, answer, entry = self._source(category).sample(rng)
        return Problem(prompt=format_prompt(question), answer=answer, category=category, entry=entry)

    def reward(self, problem: Problem, completion_text: str) -> float:
        """1.0 if the completion's answer (:func:`parse_completion`) is correct, else 0.0."""
        return self._source(problem.category).score(parse_completion(completion_text), problem)

    def demonstration(self, problem: Problem) -> str:
        """The target completion text for supervised warm-up (the policy appends ``<eos>`` after it)."""
        return problem.answer


def make_taskset(tasks: Sequence[TaskSpec | dict[str, Any]], seed: int) -> TaskSet:
    """A :class:`TaskSet` from ``[{"name": "arithmetic", "levels": [1, 2, 3]}, ...]`` (or :class:`TaskSpec` models);
    a task without ``levels`` uses all of its levels."""
    return TaskSet(tasks, seed)
