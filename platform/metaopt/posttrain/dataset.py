"""The researcher's own problems: a JSONL file of prompts and answers, its categories from a column.

Each line of the file is a JSON object such as ``{"prompt": "2+3", "answer": "5", "topic": "addition"}``; the
column names are settable (``prompt_key``, ``answer_key``, ``category_key``). The category column is what the
curriculum chooses between (SEC, uniform and ordered curricula work on it unchanged); without one, every row is
in the one category ``dataset``. Categories are ordered by their first appearance in the file, or as
``category_order`` lists them, which is the easy -> hard order the ordered curricula follow.

Evaluation never sees a training row: per category, a fixed share of the rows (``eval_fraction``, default 0.2,
at least one and at most all but one; rows that repeat a prompt count once and stay together) is held out by a
permutation seeded with ``split_seed`` and the category's name only -- not the run's seed -- so every trial, seed
and curriculum is evaluated on the same rows (:func:`split_dataset`). GRPO, the warm-up and the curriculum draw
from the training rows; the greedy evaluation scores the held-out rows, each once, in split order (at most
``eval_per_category`` of them). A category of one distinct prompt cannot be split: one ConfigError before Ray
starts.

Reading is capped (:data:`MAX_ROWS` rows by default, :data:`MAX_LINE_BYTES` per line) and every problem is one
ConfigError line naming ``file:line``. Answers are compared by the user's ``reward`` (``module:function`` called
as ``score(completion, answer) -> float`` in a worker process with a time limit, :mod:`.rewards`) or, without
one, by exact match of the normalised answer (:func:`metaopt.posttrain.rewards.exact_match`).

Nothing here imports torch or Ray.
"""

from __future__ import annotations

import json
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from metaopt import user_code
from metaopt.config import StrictModel, absolute_path, quote, quote_path, validation_base
from metaopt.errors import ConfigError
from metaopt.posttrain.rewards import USER_REWARD_PARAMS

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_ROWS",
    "DatasetRows",
    "DatasetSpec",
    "DatasetSplit",
    "held_out_count",
    "read_dataset",
    "split_dataset",
]

MAX_ROWS = 100_000
MAX_LINE_BYTES = 1 << 20
NO_CATEGORY = "dataset"


class DatasetSpec(StrictModel):
    """A JSONL file of problems: ``path``, the columns to read, and the reward that scores a completion."""

    path: str = Field(description="JSONL file, one problem per line (relative to where metaopt runs).")
    prompt_key: str = Field(default="prompt", min_length=1, description="Column holding the prompt (a string).")
    answer_key: str = Field(default="answer", min_length=1, description="Column holding the reference answer.")
    category_key: str | None = Field(
        default=None, min_length=1, description="Column holding the category (None: one category for all rows)."
    )
    category_order: list[str] | None = Field(
        default=None, min_length=1, description="Categories easy -> hard (default: order of first appearance)."
    )
    max_rows: int = Field(default=MAX_ROWS, ge=1, le=10_000_000, description="Rows read at most (the rest ignored).")
    reward: user_code.user_function(*USER_REWARD_PARAMS) | None = Field(
        default=None, description="module:function scoring (completion, answer) -> float; default: exact match."
    )
    eval_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="Share of each category's rows held out for evaluation, never trained on (at least 1 row, "
        "at most all but 1).",
    )
    split_seed: int = Field(
        default=0,
        ge=0,
        description="Seed of the held-out split; independent of the run's seeds, so every trial is evaluated on "
        "the same rows.",
    )

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str, info: ValidationInfo) -> str:
        return absolute_path(path, info, directory=False, what="JSONL file", check=False)

    @field_validator("category_order")
    @classmethod
    def _distinct(cls, order: list[str] | None) -> list[str] | None:
        if order is not None and len(set(order)) != len(order):
            raise ValueError(f"each category once (got {order})")
        return order

    @model_validator(mode="after")
    def _readable(self, info: ValidationInfo) -> DatasetSpec:
        """Where the experiment runs here: the file parses, the columns exist, the categories match, and each
        category has rows enough for the held-out split."""
        if validation_base(info)[1]:
            split_dataset(self, read_dataset(self))
        return self


@dataclass
class DatasetRows:
    """The problems of a file: ``categories`` in curriculum order, each with its (prompt, answer) rows."""

    categories: list[str]
    rows: dict[str, list[tuple[str, str]]]
    first: tuple[str, str]  # the file's first row: the reward is checked on it before Ray starts


@dataclass
class DatasetSplit:
    """Each category's rows split in two: ``train`` (GRPO, warm-up, curriculum) and ``held_out`` (evaluation only,
    in split order)."""

    train: dict[str, list[tuple[str, str]]]
    held_out: dict[str, list[tuple[str, str]]]


def held_out_count(prompts: int, fraction: float) -> int:
    """Distinct prompts held out of a category of ``prompts`` (>= 2): ``round(fraction * prompts)``, at least 1 and
    at most all but 1."""
    return min(prompts - 1, max(1, round(fraction * prompts)))


def _split_rng(split_seed: int, category: str) -> np.random.Generator:
    """The split's generator for one category: ``split_seed`` and the category's name, nothing of the run."""
    return np.random.default_rng([split_seed, zlib.crc32(category.encode("utf-8"))])


def split_dataset(spec: DatasetSpec, data: DatasetRows) -> DatasetSplit:
    """Per category, the distinct prompts are permuted by a generator seeded with ``spec.split_seed`` and the
    category's name, and the rows of the first ``held_out_count`` of them are held out (in permutation order); the
    other rows, in file order, are the training rows. Rows repeating a prompt go to the same side, so no held-out
    prompt is ever trained on. A category of fewer than 2 distinct prompts is one ConfigError naming ``path``, the
    category and its column."""
    train: dict[str, list[tuple[str, str]]] = {}
    held_out: dict[str, list[tuple[str, str]]] = {}
    for category in data.categories:
        rows = data.rows[category]
        groups: dict[str, list[int]] = {}
        for index, (prompt, _) in enumerate(rows):
            groups.setdefault(prompt, []).append(index)
        if len(groups) < 2:
            raise ConfigError("path", _unsplittable(spec, category, len(rows)))
        prompts = list(groups)
        order = _split_rng(spec.split_seed, category).permutation(len(prompts))
        count = held_out_count(len(prompts), spec.eval_fraction)
        held = [i for g in order[:count] for i in groups[prompts[g]]]
        held_out[category] = [rows[i] for i in held]
        kept = set(held)
        train[category] = [row for i, row in enumerate(rows) if i not in kept]
    return DatasetSplit(train, held_out)


def _unsplittable(spec: DatasetSpec, category: str, rows: int) -> str:
    which = (
        "the file" if spec.category_key is None else f"category {quote(category)} (column {quote(spec.category_key)})"
    )
    has = "has 1 row" if rows == 1 else f"has {rows} rows but 1 distinct prompt"
    return (
        f"{Path(spec.path).name}: {which} {has}; the held-out split (eval_fraction) needs at least 2 distinct "
        "prompts per category: add rows"
    )


def _open_capped(path: Path):
    """The file opened for reading: a regular file (a FIFO would block forever), else one ConfigError."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError("path", f"{quote_path(path)}: file not found") from None
    except OSError as err:
        raise ConfigError("path", f"{quote_path(path)}: cannot read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError("path", f"{quote_path(path)}: not a regular file, expected a JSONL file")
    return path.open("rb")


def _capped_lines(handle: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """The file's lines (newline included), each read at most ``limit`` + 1 bytes at a time, so a line without
    end is never held whole: None for a line over ``limit`` bytes, and the reading stops there."""
    while raw := handle.readline(limit + 1):
        if len(raw) > limit:
            yield None
            return
        yield raw


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"


def _text(value: Any, where: str, column: str, allow_numbers: bool) -> str:
    if isinstance(value, str) and value.strip():
        return value
    if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kinds = "a non-empty string or a number" if allow_numbers else "a non-empty string"
    raise ConfigError("path", f"{where}: column {quote(column)} must be {kinds}, got {quote(value)}")


def read_dataset(spec: DatasetSpec) -> DatasetRows:
    """The rows of ``spec.path`` (at most ``spec.max_rows``), grouped by category; one ConfigError naming
    ``path`` (with ``file:line``) or ``category_order`` on any problem."""
    path = Path(spec.path)
    rows: dict[str, list[tuple[str, str]]] = {}
    first: tuple[str, str] | None = None
    with _open_capped(path) as handle:
        for number, raw in enumerate(_capped_lines(handle, MAX_LINE_BYTES), start=1):
            where = f"{path.name}:{number}"
            if raw is None:
                raise ConfigError("path", f"{where}: line longer than {_size(MAX_LINE_BYTES)}")
            if not raw.strip():
                continue
            if sum(len(r) for r in rows.values()) >= spec.max_rows:
                break
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as err:
                raise ConfigError("path", f"{where}: not valid JSON ({str(err).splitlines()[0][:120]})") from None
            if not isinstance(record, dict):
                raise ConfigError("path", f"{where}: expected a JSON object, got {type(record).__name__}")
            for column in (spec.prompt_key, spec.answer_key, spec.category_key):
                if column is not None and column not in record:
                    present = ", ".join(sorted(map(str, record))[:10])
                    raise ConfigError("path", f"{where}: no column {quote(column)} (columns: {present})")
            prompt = _text(record[spec.prompt_key], where, spec.prompt_key, allow_numbers=False)
            answer = _text(record[spec.answer_key], where, spec.answer_key, allow_numbers=True)
            category = (
                NO_CATEGORY
                if spec.category_key is None
                else _text(record[spec.category_key], where, spec.category_key, allow_numbers=True)
            )
            rows.setdefault(category, []).append((prompt, answer))
            first = first or (prompt, answer)
    if first is None:
        raise ConfigError("path", f"{quote_path(path)}: no rows")
    return DatasetRows(_ordered(list(rows), spec.category_order), rows, first)


def _ordered(seen: list[str], order: list[str] | None) -> list[str]:
    if order is None:
        return seen
    missing, unknown = [c for c in seen if c not in order], [c for c in order if c not in seen]
    if missing or unknown:
        problem = f"lacks {missing}" if missing else f"names {unknown}, which the file does not have"
        raise ConfigError("category_order", f"{problem}; the file's categories: {seen}")
    return list(order)
