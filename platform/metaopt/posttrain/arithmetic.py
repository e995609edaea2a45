"""Safe scoring of model-written arithmetic: a tiny exact evaluator, never ``eval``, never sympy.

A policy's completion is untrusted text. reasoning-gym's countdown scorer hands it to sympy's ``parse_expr``,
which calls Python's ``eval``: a completion could run code (``__import__('os').system(...)``) or stall the
learner for minutes (``9**9**9**9``). Completions are scored here instead, by a small tokenizer and a
recursive-descent parser over exactly what the answers need:

    expression := term (("+" | "-") term)*
    term       := factor (("*" | "/") factor)*
    factor     := ("+" | "-") factor | NUMBER | "(" expression ")"

with exact rational arithmetic (:class:`fractions.Fraction`). Evaluation is provably short: the text is at most
:data:`MAX_CHARS` characters, so there are at most that many tokens and operations; parentheses and unary signs
nest at most :data:`MAX_DEPTH` deep (the parser's recursion); and every literal and every intermediate value
must have numerator and denominator below :data:`MAX_MAGNITUDE`, so each operation works on integers of a few
hundred bits. A wall-clock budget per answer (:data:`BUDGET_S`) is checked at every token on top of that, as a
second line of defence; it needs no signals, so it works inside Ray actor threads. Anything outside the
grammar or the bounds, and division by zero, raises :class:`ExpressionError` (a wrong answer).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from fractions import Fraction

__all__ = [
    "BUDGET_S",
    "MAX_CHARS",
    "MAX_DEPTH",
    "MAX_MAGNITUDE",
    "ExpressionError",
    "evaluate",
    "parse",
    "score_countdown",
]

MAX_CHARS = 256  # countdown answers are ~20 characters; chain_sum's longest ~30
MAX_DEPTH = 32  # nesting of parentheses and unary signs (also bounds the parser's recursion)
MAX_MAGNITUDE = 10**30  # bound on |numerator| and denominator of every literal and intermediate value
BUDGET_S = 1.0  # wall-clock seconds per answer: a last resort the bounds above make unreachable (a tight one
# would make rewards depend on the machine's load)

_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")  # ASCII digits only: no Unicode numerals


class ExpressionError(ValueError):
    """The text is not a bounded arithmetic expression of our grammar (or divides by zero): a wrong answer."""


def _tokenize(text: str) -> list[str]:
    """Numbers and the six operator characters, whitespace between them skipped; any other character
    (letters, dots, quotes, underscores, ``=``) is rejected before any evaluation starts."""
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"longer than {MAX_CHARS} characters")
    tokens, position, end = [], 0, len(text.rstrip())
    while position < end:
        match = _TOKEN.match(text, position)
        if match is None:
            raise ExpressionError(f"unexpected character at {position}")
        tokens.append(match.group(1) or match.group(2))
        position = match.end()
    if not tokens:
        raise ExpressionError("empty expression")
    return tokens


class _Parser:
    """Recursive descent over the token list, evaluating as it goes (no tree is kept)."""

    def __init__(self, tokens: list[str], budget_s: float):
        self.tokens = tokens
        self.position = 0
        self.literals: list[int] = []
        self.deadline = time.monotonic() + budget_s

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self) -> str:
        if time.monotonic() > self.deadline:
            raise ExpressionError("over the time budget")
        token = self._peek()
        if token is None:
            raise ExpressionError("unexpected end of expression")
        self.position += 1
        return token

    def expression(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            value = _bounded(value + self.term(depth) if self._take() == "+" else value - self.term(depth))
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self._peek() in ("*", "/"):
            if self._take() == "*":
                value = _bounded(value * self.factor(depth))
            else:
                divisor = self.factor(depth)
                if divisor == 0:
                    raise ExpressionError("division by zero")
                value = _bounded(value / divisor)
        return value

    def factor(self, depth: int) -> Fraction:
        if depth >= MAX_DEPTH:
            raise ExpressionError(f"nested deeper than {MAX_DEPTH}")
        token = self._take()
        if token in ("+", "-"):
            value = self.factor(depth + 1)
            return value if token == "+" else -value
        if token == "(":
            value = self.expression(depth + 1)
            if self._take() != ")":
                raise ExpressionError("unbalanced parentheses")
            return value
        if token.isdigit():
            if token[0] == "0" and token.strip("0"):  # "019": not a number in Python, nor to reasoning-gym
                raise ExpressionError("a number with a leading zero")
            number = int(token)  # at most MAX_CHARS digits: far below int()'s own digit limit
            self.literals.append(number)
            return _bounded(Fraction(number))
        raise ExpressionError(f"unexpected {token!r}")


def _bounded(value: Fraction) -> Fraction:
    """``value``, or ExpressionError when it leaves the magnitude bound (what keeps every operation cheap)."""
    if abs(value.numerator) >= MAX_MAGNITUDE or value.denominator >= MAX_MAGNITUDE:
        raise ExpressionError("a value exceeds the magnitude bound")
    return value


def parse(text: str, budget_s: float = BUDGET_S) -> tuple[Fraction, list[int]]:
    """The exact value of ``text`` and its integer literals in order of appearance; ExpressionError if
    ``text`` is not a bounded expression of the grammar in the module docstring."""
    if not isinstance(text, str):
        raise ExpressionError("not a string")
    parser = _Parser(_tokenize(text), budget_s)
    value = parser.expression(0)
    if parser.position != len(parser.tokens):
        raise ExpressionError(f"unexpected {parser.tokens[parser.position]!r} after a complete expression")
    return value, parser.literals


def evaluate(text: str, budget_s: float = BUDGET_S) -> Fraction:
    """The exact value of ``text`` (see :func:`parse`)."""
    return parse(text, budget_s)[0]


def score_countdown(answer: str | None, numbers: Sequence[int], target: int) -> float:
    """1.0 when ``answer`` is a correct countdown solution, else 0.0 — reasoning-gym's countdown rules, safely.

    reasoning-gym (``CountdownDataset.score_answer``) requires the integer literals of the answer, as a multiset,
    to equal the given numbers (each used exactly once, none added) and the value to equal the target. Two
    deliberate differences, both stricter: the value must equal the target exactly (reasoning-gym compares
    floats with ``np.isclose``), and only ``+ - * /``, parentheses and signs are accepted (sympy would also
    take ``**``, decimals and function calls). A wrong answer scores 0.0 here; reasoning-gym's small partial
    credit is not a full score either, and the curriculum counts only full scores.
    """
    if answer is None:
        return 0.0
    try:
        value, literals = parse(answer)
    except ExpressionError:
        return 0.0
    return float(sorted(literals) == sorted(numbers) and value == target)
