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

Beyond these, any reasoning-gym dataset by name (the list is reasoning-gym's registry, ``reasoning_gym.factory``),
with its own ``options`` (the fields of its config dataclass, checked by reasoning-gym's ``validate``): one
category per task (named by ``label``, default the task's name, so one task may be listed twice with different
options), its full question as the prompt, scored by reasoning-gym's own ``score_answer`` (full score or nothing)
in a worker process with a time limit (:mod:`.rewards`), where guards refuse, while a scorer runs, Python's
``eval``/``exec`` and sympy's ``parse_expr``/``sympify`` on text that is not the dataset's own: a completion such
a scorer tries to evaluate scores 0. A task whose scorer evaluates its own correct answer that way
(``polynomial_multiplication``, ``puzzle24``, the integration tasks) is refused before Ray starts
(:func:`evaluating_gym_task`). An unknown name is one line with the close matches. The researcher's own problems
come from a JSONL file (:mod:`.dataset`), one category per value of its category column, scored by the user's
reward function in the same worker process (the user's code: not guarded), or by exact match.

A prompt is rendered from the question by ``render`` (default :func:`format_prompt`; a local model with a chat
template renders it as a user turn, :func:`metaopt.posttrain.policy.prompt_renderer`).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, Field, Strict, ValidationError, ValidationInfo, model_validator

from metaopt.config import StrictModel, first_error, quote
from metaopt.errors import ConfigError
from metaopt.extras import install_command, require, runs_here
from metaopt.posttrain.arithmetic import MAX_CHARS, score_countdown
from metaopt.posttrain.dataset import DatasetSpec, read_dataset, split_dataset
from metaopt.posttrain.rewards import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, ScorerProcess, exact_match

__all__ = [
    "ARITHMETIC_LEVELS",
    "GYM_LEVELS",
    "TASK_LEVELS",
    "TASK_NAMES",
    "HeldOut",
    "Levels",
    "Problem",
    "TaskList",
    "TaskSet",
    "TaskSpec",
    "each_task_once",
    "evaluating_gym_task",
    "format_prompt",
    "make_taskset",
    "parse_completion",
    "reasoning_gym_names",
]

END_MARKERS = ("<eos>", "\n")


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer; ``entry`` is the reasoning-gym item (None for our own tasks)."""

    prompt: str
    answer: str
    category: str
    entry: dict | None = None
    index: int | None = None  # the item's index in its reasoning-gym dataset (scored again in a worker process)


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


# ---------------------------------------------------------------------------
# Any reasoning-gym dataset by name: the names and option fields are reasoning-gym's.
# ---------------------------------------------------------------------------

_OURS = ("seed", "size")  # set per run and category; not the user's to choose


#: The form of a task name (every reasoning-gym name has it): what is checked where the run happens elsewhere.
_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def reasoning_gym_names() -> tuple[str, ...]:
    """Every dataset name reasoning-gym registers (its factory's registry), sorted."""
    return tuple(sorted(_gym_registry()))


def _gym_registry() -> dict[str, Any]:
    """reasoning-gym's registry of datasets (name -> (class, config class)); a reasoning-gym that is missing or
    does not import is one ConfigError line naming the ``posttrain`` extra."""
    require("posttrain", "")
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as err:
        raise ConfigError(
            "", f"reasoning-gym did not import ({type(err).__name__}: {err}); {install_command('posttrain')}"
        ) from None
    return DATASETS


def _gym_options_problem(name: str, options: dict[str, Any]) -> str | None:
    """Why reasoning-gym refuses ``options`` for ``name`` (unknown field, invalid value), or None."""
    from dataclasses import fields

    config_class = _gym_registry()[name][1]
    allowed = [f.name for f in fields(config_class) if f.name not in _OURS]
    for key in options:
        if key not in allowed:
            return f"{name} has no option {quote(key)}; its options: {', '.join(allowed)}"
    try:
        config = config_class(**options)
        if hasattr(config, "validate"):
            config.validate()
    except Exception as err:  # reasoning-gym validates with asserts and ValueErrors
        text = str(err).strip().splitlines()
        return f"reasoning-gym refuses these options for {name}: {type(err).__name__}" + (
            f": {text[0][:160]}" if text else ""
        )
    return None


class _ArithmeticSource:
    isolated = False

    def __init__(self, level: int):
        self.generate = ARITHMETIC_LEVELS[level]

    def sample(self, rng: np.random.Generator) -> tuple[str, str, dict | None, int | None]:
        question, answer = self.generate(rng)
        return question, answer, None, None

    def score(self, answer: str, problem: Problem) -> float:
        return float(answer == problem.answer)


class _GymSource:
    """A reasoning-gym dataset; ``short`` (the four levelled tasks) rewrites the question into the short form and
    scores here (safely); any other task keeps its question and is scored in the worker process (``isolated``)."""

    def __init__(self, task: str, kwargs: dict[str, Any], seed: int, short: bool):
        import reasoning_gym  # only reasoning-gym tasks need it: our own arithmetic runs without it

        self.task, self.short, self.isolated = task, short, not short
        self.spec = {"kind": "gym", "name": task, "options": kwargs, "seed": seed, "size": _GYM_SIZE}
        self.dataset = reasoning_gym.create_dataset(task, size=_GYM_SIZE, seed=seed, **kwargs)

    def sample(self, rng: np.random.Generator) -> tuple[str, str, dict | None, int | None]:
        index = int(rng.integers(len(self.dataset)))
        entry = self.dataset[index]
        if self.short:
            return _short_question(self.task, entry), entry["answer"].replace(" ", ""), entry, index
        return entry["question"], str(entry["answer"]), entry, index

    def score(self, answer: str, problem: Problem) -> float:
        """Full score or nothing; countdown through our safe evaluator, never reasoning-gym's sympy ``eval``."""
        if len(answer) > MAX_CHARS:  # no correct answer is this long; keeps every scorer's work bounded
            return 0.0
        assert problem.entry is not None, "a reasoning-gym problem carries its entry"
        if self.task == "countdown":
            metadata = problem.entry["metadata"]
            return score_countdown(answer, metadata["numbers"], metadata["target"])
        return float(self.dataset.score_answer(answer, problem.entry) >= 1.0)


class _DatasetSource:
    """One category of the user's JSONL problems, scored by the user's reward (``isolated``) or exact match:
    ``rows`` the training rows (all :meth:`sample` draws from), ``held_out`` the evaluation rows, in split order."""

    def __init__(self, rows: list[tuple[str, str]], held_out: list[tuple[str, str]], isolated: bool):
        self.rows, self.held_out, self.isolated = rows, held_out, isolated

    def sample(self, rng: np.random.Generator) -> tuple[str, str, dict | None, int | None]:
        prompt, answer = self.rows[int(rng.integers(len(self.rows)))]
        return prompt, answer, None, None

    def score(self, answer: str, problem: Problem) -> float:
        return exact_match(answer, problem.answer)


_Source = _ArithmeticSource | _GymSource | _DatasetSource


def _known_task(name: str, info: ValidationInfo) -> str:
    """Ours, or one of reasoning-gym's registered names where the run happens here; where it runs elsewhere
    (``metaopt submit``/``list``: validation context ``check_paths`` false) only the name's form is checked, so
    this machine needs no reasoning-gym."""
    if name in TASK_LEVELS:
        return name
    if not runs_here(info.context):
        if not _TASK_NAME.match(name):
            raise ValueError(f"{quote(name)} is not a task name (letters, digits and _; like basic_arithmetic)")
        return name
    names = reasoning_gym_names()
    if name not in names:
        close = difflib.get_close_matches(name, [*TASK_NAMES, *names], n=4, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(
            f"unknown task {quote(name)}; allowed: arithmetic, any of reasoning-gym's {len(names)} datasets "
            f"(reasoning_gym.factory.DATASETS){hint}"
        )
    return name


#: Difficulty levels as written: integers (1 = easiest).
Levels = list[Annotated[int, Strict()]]


class TaskSpec(StrictModel):
    """A task and the difficulty levels used as curriculum categories (task x level), or any other reasoning-gym
    task with its options (one category)."""

    name: Annotated[str, AfterValidator(_known_task)] = Field(
        description="arithmetic (ours), a levelled reasoning-gym generator (basic_arithmetic, chain_sum, products, "
        "countdown) or any reasoning-gym dataset name."
    )
    levels: Levels | None = Field(
        default=None, min_length=1, description="Difficulty levels (None: every level of the task)."
    )
    options: dict[str, Any] | None = Field(
        default=None,
        description="reasoning-gym config fields of the dataset (for a levelled one, on top of the level's).",
    )
    label: str | None = Field(
        default=None, min_length=1, description="Category name (default: the task's name), e.g. one per option set."
    )

    @model_validator(mode="after")
    def _levels_of_the_task(self, info: ValidationInfo) -> TaskSpec:
        known = TASK_LEVELS.get(self.name, ())
        if self.levels is not None and not known:
            raise ConfigError("levels", f"task {quote(self.name)} has no levels; choose its difficulty with options")
        for level in self.levels or ():
            if level not in known:
                raise ConfigError("levels", f"task {quote(self.name)} has no level {level}; levels: {list(known)}")
        if self.levels is not None and len(set(self.levels)) != len(self.levels):
            raise ConfigError("levels", f"each level once (got {self.levels})")
        if self.options is not None:
            if self.name == "arithmetic":
                raise ConfigError("options", "arithmetic (ours) has levels, not options")
            if not runs_here(info.context):  # reasoning-gym checks them where the run happens
                return self
            for kwargs in [{**GYM_LEVELS[self.name][level], **self.options} for level in self.all_levels] or [
                self.options
            ]:
                problem = _gym_options_problem(self.name, kwargs)
                if problem:
                    raise ConfigError("options", problem)
        return self

    @property
    def all_levels(self) -> list[int]:
        """The levels used, easy -> hard (none for a task without levels)."""
        return sorted(self.levels) if self.levels is not None else list(TASK_LEVELS.get(self.name, ()))

    @property
    def category_prefix(self) -> str:
        return self.label or self.name


def each_task_once(tasks: list[TaskSpec]) -> list[TaskSpec]:
    """Each category once: a task in one entry (its levels together), or with a ``label`` of its own; a
    ConfigError on the repeat."""
    names = [task.category_prefix for task in tasks]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(
                str(i),
                f"task {quote(name)} is listed twice; give all its levels in one entry "
                "(or each entry a label of its own)",
            )
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


def dataset_spec(dataset: DatasetSpec | dict[str, Any]) -> DatasetSpec:
    """``dataset`` validated (paths already absolute); one ConfigError naming ``posttrain.dataset.<field>``."""
    if isinstance(dataset, DatasetSpec):
        return dataset
    try:
        return DatasetSpec.model_validate(dataset)
    except ValidationError as err:
        raise first_error("posttrain.dataset", DatasetSpec, err) from None


def evaluating_gym_task(
    tasks: Sequence[TaskSpec], timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int | None = DEFAULT_MEMORY_MB
) -> tuple[int, str] | None:
    """The first task (its index, one line why) whose reasoning-gym scorer evaluates the completion: each task
    without levels (those are scored in the worker process) scores its first generated problem's own correct answer
    in a guarded worker process (:func:`metaopt.posttrain.rewards.install_evaluation_guards`); None when no guard
    triggers. A correct answer that scores below 1.0 for another reason (a raise, a time-out) is not refused here:
    it scores 0 during the run, as any failing completion does. A worker that does not start is a ConfigError."""
    probed = {str(i): task for i, task in enumerate(tasks) if task.name not in TASK_LEVELS}
    if not probed:
        return None
    import reasoning_gym

    specs = {
        key: {"kind": "gym", "name": task.name, "options": dict(task.options or {}), "seed": 0, "size": _GYM_SIZE}
        for key, task in probed.items()
    }
    answers = {
        key: str(reasoning_gym.create_dataset(spec["name"], size=_GYM_SIZE, seed=0, **spec["options"])[0]["answer"])
        for key, spec in specs.items()
    }
    scorers = ScorerProcess(specs, timeout_s, memory_mb=memory_mb)
    try:
        for key, answer in answers.items():
            refused = scorers.score(key, answer, answer, 0).refused
            if refused is not None:
                return int(key), (
                    f"reasoning-gym's {quote(probed[key].name)} scores by evaluating the completion ({refused}); "
                    "metaopt never evaluates model-written text: choose another task or score it with your own "
                    "reward on a JSONL dataset"
                )
    finally:
        scorers.close()
    return None


#: Failures of the reward worker printed per task set (then only counted, ``reward_failures``).
_FAILURES_SHOWN = 3


class TaskSet:
    """The categories of a run, easy -> hard within each task, tasks in the order given (or a dataset's).

    ``tasks``: :class:`TaskSpec` models or mappings (``[{"name": "arithmetic", "levels": [1, 2, 3]}, ...]``),
    validated here; or ``dataset`` (a :class:`~metaopt.posttrain.dataset.DatasetSpec` or its mapping) instead.
    ``render`` turns a question into the prompt; ``reward_timeout_s`` bounds every scorer run in the worker
    process, ``reward_memory_mb`` its address space (None: no cap). Sampling is driven only by the ``rng`` passed
    in, so a run that seeds its generator is reproducible. Call :meth:`close` when done (it stops the worker
    process, if one was started).
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | dict[str, Any]],
        seed: int,
        *,
        dataset: DatasetSpec | dict[str, Any] | None = None,
        render: Callable[[str], str] = format_prompt,
        reward_timeout_s: float = DEFAULT_TIMEOUT_S,
        reward_memory_mb: int | None = DEFAULT_MEMORY_MB,
    ):
        self.categories: list[str] = []
        self.render = render
        self.reward_failures = 0
        self._levels: dict[str, int] = {}
        self._sources: dict[str, _Source] = {}
        scorers: dict[str, dict[str, Any]] = {}
        if dataset is not None:
            spec = dataset_spec(dataset)
            try:
                data = read_dataset(spec)
                split = split_dataset(spec, data)
            except ConfigError as err:  # named as in the file: posttrain.dataset.<field>
                raise ConfigError(f"posttrain.dataset.{err.field}", err.problem) from None
            if spec.reward is not None:
                scorers["reward"] = {"kind": "user", "reference": spec.reward}
            for position, category in enumerate(data.categories):
                source = _DatasetSource(split.train[category], split.held_out[category], spec.reward is not None)
                self._add(category, position + 1, source)
        else:
            for task_index, task in enumerate(task_specs(tasks)):
                self._add_task(task_index, task, seed, scorers)
        self._scorers = ScorerProcess(scorers, reward_timeout_s, memory_mb=reward_memory_mb) if scorers else None

    def _add(self, category: str, level: int, source: _Source) -> None:
        self.categories.append(category)
        self._levels[category] = level
        self._sources[category] = source

    def _add_task(self, task_index: int, spec: TaskSpec, seed: int, scorers: dict[str, dict[str, Any]]) -> None:
        task = spec.name
        for level in spec.all_levels or [None]:
            # a distinct dataset seed per (run seed, task, level)
            dataset_seed = int(np.random.SeedSequence([seed, task_index, level or 0]).generate_state(1)[0])
            if task == "arithmetic":
                source: _Source = _ArithmeticSource(level)
            elif level is not None:
                source = _GymSource(task, {**GYM_LEVELS[task][level], **(spec.options or {})}, dataset_seed, True)
            else:
                source = _GymSource(task, dict(spec.options or {}), dataset_seed, False)
            category = spec.category_prefix if level is None else f"{spec.category_prefix}/L{level}"
            if source.isolated:
                scorers[category] = source.spec
            self._add(category, level or 1, source)

    def _source(self, category: str) -> _Source:
        if category not in self._sources:
            raise KeyError(f"unknown category {category!r}; this task set has {', '.join(self.categories)}")
        return self._sources[category]

    def difficulty(self, category: str) -> int:
        """The category's level (1 = easiest; a dataset's categories count 1, 2, ... in curriculum order; a task
        without levels is 1)."""
        self._source(category)
        return self._levels[category]

    def sample(self, category: str, rng: np.random.Generator) -> Problem:
        question, answer, entry, index = self._source(category).sample(rng)
        return Problem(prompt=self.render(question), answer=answer, category=category, entry=entry, index=index)

    def held_out(self) -> HeldOut:
        """The task set as the evaluation sees it: a dataset's held-out rows, never its training rows."""
        return HeldOut(self)

    def reward(self, problem: Problem, completion_text: str) -> float:
        """The completion's reward: 1.0 if its answer (:func:`parse_completion`) is correct, else 0.0; a dataset
        with a ``reward`` function gets that function's value on the whole completion text, in the worker process
        (a failure or timeout is 0.0, counted in :attr:`reward_failures`)."""
        source = self._source(problem.category)
        if not source.isolated:
            return source.score(parse_completion(completion_text), problem)
        assert self._scorers is not None
        if isinstance(source, _DatasetSource):
            result = self._scorers.score("reward", completion_text, problem.answer)
        else:
            answer = parse_completion(completion_text)
            if len(answer) > MAX_CHARS:  # no answer of these tasks is this long; keeps every scorer's work bounded
                return 0.0
            result = self._scorers.score(problem.category, answer, problem.answer, problem.index)
        if result.problem is not None:
            self.reward_failures += 1
            if self.reward_failures <= _FAILURES_SHOWN:
                print(f"[metaopt] reward failure ({problem.category}, scored 0): {result.problem}", file=sys.stderr)
        return result.value

    def demonstration(self, problem: Problem) -> str:
        """The target completion text for supervised warm-up (the policy appends ``<eos>`` after it)."""
        return problem.answer

    def close(self) -> None:
        """Stop the reward worker process (a no-op when none was started)."""
        if self._scorers is not None:
            self._scorers.close()


class HeldOut:
    """The evaluation's view of a :class:`TaskSet`: :meth:`sample` gives a dataset category's held-out rows in
    split order, one after the other (the same rows for every trial: the split's seed is not the run's), and any
    other category's problems as :meth:`TaskSet.sample` draws them (procedural generators: other items by the
    evaluation's seed). Ask :meth:`count` how many problems a category has, so no held-out row is scored twice."""

    def __init__(self, taskset: TaskSet):
        self.taskset = taskset
        self._next: dict[str, int] = {}

    def count(self, category: str, per_category: int) -> int:
        """Problems to evaluate of ``category``: ``per_category``, or a dataset category's held-out rows if fewer."""
        source = self.taskset._source(category)
        return min(per_category, len(source.held_out)) if isinstance(source, _DatasetSource) else per_category

    def sample(self, category: str, rng: np.random.Generator) -> Problem:
        source = self.taskset._source(category)
        if not isinstance(source, _DatasetSource):
            return self.taskset.sample(category, rng)
        index = self._next.get(category, 0)
        self._next[category] = index + 1
        question, answer = source.held_out[index % len(source.held_out)]
        return Problem(prompt=self.taskset.render(question), answer=answer, category=category)

    def reward(self, problem: Problem, completion_text: str) -> float:
        return self.taskset.reward(problem, completion_text)


def make_taskset(
    tasks: Sequence[TaskSpec | dict[str, Any]],
    seed: int,
    *,
    dataset: DatasetSpec | dict[str, Any] | None = None,
    render: Callable[[str], str] = format_prompt,
    reward_timeout_s: float = DEFAULT_TIMEOUT_S,
    reward_memory_mb: int | None = DEFAULT_MEMORY_MB,
) -> TaskSet:
    """A :class:`TaskSet` from ``[{"name": "arithmetic", "levels": [1, 2, 3]}, ...]`` (or :class:`TaskSpec` models);
    a task without ``levels`` uses all of its levels. ``dataset``: the user's JSONL problems instead of tasks."""
    return TaskSet(
        tasks,
        seed,
        dataset=dataset,
        render=render,
        reward_timeout_s=reward_timeout_s,
        reward_memory_mb=reward_memory_mb,
    )
