"""Program text: print and parse optimizer programs (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms", Sec. 2.1 and Program 1).

The text form is the Python-like function the paper shows::

    def train(w, g, m, v, lr):
        g2 = square(g)
        m = interp(g, m, 0.9)
        update = m / sqrt_v
        return update, m, v

:func:`format_program` prints a :class:`~metaopt.symbolic.program.Program`; :func:`parse_program` reads the text
back with a small hand-written tokenizer and parser (no ``ast``, no ``eval``): ``parse_program(format_program(p))
== p`` for every valid program. Each statement is ``name = op(arg, ...)`` or ``name = a OP b`` with OP one of
``+ - * /`` (one operation per statement); arguments are variables, numeric literals (``0.9``, ``-1e-3``) or the
named constants of :data:`~metaopt.symbolic.program.NAMED_CONSTANTS`. Blank lines and ``#`` comments are
ignored. Errors raise :class:`ProgramSyntaxError` naming the 1-based line.

:func:`check_program` applies the same checks (known primitive, arity, variables assigned before use, argument
types, ``update`` assigned) to a program given as data; its line numbers refer to the :func:`format_program` text.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from metaopt.symbolic.program import (
    INFIX,
    INPUT_TYPES,
    INPUTS,
    NAMED_CONSTANTS,
    OUTPUTS,
    PRIMITIVES,
    Arg,
    Const,
    Program,
    Statement,
    Var,
    result_type,
)

__all__ = ["ProgramSyntaxError", "check_program", "format_program", "parse_program"]

FUNCTION_NAME = "train"
DEF_LINE = f"def {FUNCTION_NAME}({', '.join(INPUTS)}):"
RETURN_LINE = f"return {', '.join(OUTPUTS)}"
INDENT = "    "
_OPERATOR_OPS = {symbol: op for op, symbol in INFIX.items()}
_KEYWORDS = ("def", "return")
_NON_FINITE = ("inf", "nan")  # literals for non-finite constants, so that every Const has a text form


class ProgramSyntaxError(ValueError):
    """A malformed or invalid program text; ``line`` is 1-based, ``message`` says what is wrong."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


# ---- printing ----------------------------------------------------------------------------------------------


def format_arg(arg: Arg) -> str:
    """A variable's name, a named constant's name, or a float literal that parses back to the same value."""
    if isinstance(arg, Var):
        return arg.name
    if arg.name is not None:
        return arg.name
    value = float(arg.value)
    return repr(value)  # repr of a float round-trips; inf / -inf / nan are literals of the language too


def format_statement(statement: Statement) -> str:
    args = [format_arg(a) for a in statement.args]
    if statement.op in INFIX and len(args) == 2:
        return f"{statement.target} = {args[0]} {INFIX[statement.op]} {args[1]}"
    return f"{statement.target} = {statement.op}({', '.join(args)})"


def format_program(program: Program) -> str:
    """The program as the text of ``def train(w, g, m, v, lr): ... return update, m, v`` (no trailing newline)."""
    lines = [DEF_LINE]
    lines += [INDENT + format_statement(s) for s in program.statements]
    lines.append(INDENT + RETURN_LINE)
    return "\n".join(lines)


# ---- tokens ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: str  # "name", "number", or the punctuation itself: ( ) , : = + - * /
    text: str
    column: int


_PUNCTUATION = "(),:=+-*/"


def _number_end(line: str, start: int) -> int:
    """End of a numeric literal starting at ``start`` (digits, optional fraction, optional exponent), or -1."""
    i, n = start, len(line)
    digits = 0
    while i < n and line[i].isdigit():
        i, digits = i + 1, digits + 1
    if i < n and line[i] == ".":
        i += 1
        while i < n and line[i].isdigit():
            i, digits = i + 1, digits + 1
    if digits == 0:
        return -1
    if i < n and line[i] in "eE":
        j = i + 1
        if j < n and line[j] in "+-":
            j += 1
        if j < n and line[j].isdigit():
            while j < n and line[j].isdigit():
                j += 1
            i = j
        else:
            return -1
    return i


def _tokenize(line: str, lineno: int) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if ch in " \t":
            i += 1
        elif ch == "#":
            break
        elif ch.isalpha() or ch == "_":
            j = i + 1
            while j < n and (line[j].isalnum() or line[j] == "_"):
                j += 1
            tokens.append(_Token("name", line[i:j], i))
            i = j
        elif ch.isdigit() or (ch == "." and i + 1 < n and line[i + 1].isdigit()):
            j = _number_end(line, i)
            if j < 0 or (j < n and (line[j].isalnum() or line[j] in "._")):
                end = j if j > i else i + 1
                while end < n and (line[end].isalnum() or line[end] in "._+-"):
                    end += 1
                raise ProgramSyntaxError(lineno, f"malformed number {line[i:end]!r} (column {i + 1})")
            tokens.append(_Token("number", line[i:j], i))
            i = j
        elif ch == "*" and i + 1 < n and line[i + 1] == "*":
            raise ProgramSyntaxError(lineno, f"unexpected '**' (column {i + 1}); write power(x, y)")
        elif ch in _PUNCTUATION:
            tokens.append(_Token(ch, ch, i))
            i += 1
        else:
            raise ProgramSyntaxError(lineno, f"unexpected character {ch!r} (column {i + 1})")
    return tokens


# ---- parsing -----------------------------------------------------------------------------------------------


class _LineParser:
    """Recursive-descent parser over the tokens of one line."""

    def __init__(self, tokens: list[_Token], lineno: int):
        self.tokens = tokens
        self.pos = 0
        self.lineno = lineno

    def error(self, message: str) -> ProgramSyntaxError:
        return ProgramSyntaxError(self.lineno, message)

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def next(self, what: str) -> _Token:
        token = self.peek()
        if token is None:
            raise self.error(f"expected {what}, found end of line")
        self.pos += 1
        return token

    def expect(self, kind: str, what: str | None = None) -> _Token:
        token = self.next(what or repr(kind))
        if token.kind != kind:
            raise self.error(f"expected {what or repr(kind)}, found {token.text!r} (column {token.column + 1})")
        return token

    def at_end(self) -> bool:
        return self.pos >= len(self.tokens)

    def expect_end(self, after: str) -> None:
        token = self.peek()
        if token is not None:
            raise self.error(f"unexpected {token.text!r} after {after} (column {token.column + 1})")

    # -- pieces --

    def argument(self) -> Arg:
        token = self.next("an argument (variable, number or named constant)")
        if token.kind == "-":
            following = self.peek()
            if following is not None and following.kind == "number":
                self.pos += 1
                return Const(-float(following.text))
            if following is not None and following.kind == "name" and following.text in _NON_FINITE:
                self.pos += 1
                return Const(-float(following.text))
            raise self.error(
                "a minus sign before an argument only negates numeric literals; write negative(x) for a variable"
            )
        if token.kind == "number":
            return Const(float(token.text))
        if token.kind == "name":
            if token.text in NAMED_CONSTANTS:
                return Const(NAMED_CONSTANTS[token.text], token.text)
            if token.text in _NON_FINITE:
                return Const(float(token.text))
            if token.text in _KEYWORDS:
                raise self.error(f"{token.text!r} is a keyword, not an argument")
            following = self.peek()
            if following is not None and following.kind == "(":
                raise self.error(
                    f"nested call {token.text}(...) inside an expression: one operation per statement, "
                    "assign it to a variable first"
                )
            return Var(token.text)
        raise self.error(
            f"expected an argument (variable, number or named constant), found {token.text!r} "
            f"(column {token.column + 1})"
        )

    def statement(self) -> Statement:
        target = self.expect("name", "a variable name to assign")
        name = target.text
        if name in _KEYWORDS:
            raise self.error(f"{name!r} is a keyword")
        if name in NAMED_CONSTANTS or name in _NON_FINITE:
            raise self.error(f"cannot assign to the constant {name!r}")
        equals = self.next("'='")
        if equals.kind != "=":
            raise self.error(f"expected '=' after {name!r}, found {equals.text!r} (column {equals.column + 1})")
        if self.at_end():
            raise self.error(f"nothing assigned to {name!r}")
        first = self.peek()
        following = self.tokens[self.pos + 1] if self.pos + 1 < len(self.tokens) else None
        if first.kind == "name" and following is not None and following.kind == "(":
            return self.call(name)
        left = self.argument()
        if self.at_end():
            raise self.error(
                f"expected an operation after '{name} =': a call op(arg, ...) or 'a OP b' with OP in + - * /"
            )
        operator = self.next("an operator")
        if operator.kind not in _OPERATOR_OPS:
            raise self.error(
                f"expected one of + - * / after the first operand, found {operator.text!r} "
                f"(column {operator.column + 1})"
            )
        right = self.argument()
        extra = self.peek()
        if extra is not None:
            if extra.kind in _OPERATOR_OPS:
                raise self.error(
                    f"more than one operator in a statement (column {extra.column + 1}); one operation per statement"
                )
            raise self.error(f"unexpected {extra.text!r} (column {extra.column + 1})")
        return Statement(name, _OPERATOR_OPS[operator.kind], (left, right))

    def call(self, target: str) -> Statement:
        op_token = self.expect("name")
        op = op_token.text
        if op not in PRIMITIVES:
            raise self.error(_unknown_primitive(op))
        self.expect("(", "'('")
        args: list[Arg] = []
        if self.peek() is not None and self.peek().kind == ")":
            self.pos += 1
        else:
            while True:
                args.append(self.argument())
                token = self.next("',' or ')'")
                if token.kind == ")":
                    break
                if token.kind != ",":
                    raise self.error(
                        f"expected ',' or ')' in the call to {op}, found {token.text!r} (column {token.column + 1})"
                    )
        self.expect_end(f"the call to {op}")
        arity = PRIMITIVES[op].arity
        if len(args) != arity:
            raise self.error(f"{op} takes {arity} argument{'s' if arity != 1 else ''}, got {len(args)}")
        return Statement(target, op, tuple(args))


def _unknown_primitive(op: str) -> str:
    close = difflib.get_close_matches(op, list(PRIMITIVES), n=4, cutoff=0.5)
    if close:
        return f"unknown primitive {op!r}; did you mean {', '.join(close)}?"
    return f"unknown primitive {op!r}; primitives include {', '.join(list(PRIMITIVES)[:8])}, ..."


def _parse_def(tokens: list[_Token], lineno: int) -> None:
    parser = _LineParser(tokens, lineno)
    expected = f"the function header {DEF_LINE!r}"
    parser.expect("name", expected)
    name = parser.expect("name", "the function name")
    if name.text != FUNCTION_NAME:
        raise ProgramSyntaxError(lineno, f"the function must be called {FUNCTION_NAME!r}, not {name.text!r}")
    parser.expect("(", "'('")
    params: list[str] = []
    while True:
        token = parser.next("a parameter name or ')'")
        if token.kind == ")" and not params:
            break
        if token.kind != "name":
            raise ProgramSyntaxError(lineno, f"expected a parameter name, found {token.text!r}")
        params.append(token.text)
        token = parser.next("',' or ')'")
        if token.kind == ")":
            break
        if token.kind != ",":
            raise ProgramSyntaxError(lineno, f"expected ',' or ')' in the parameters, found {token.text!r}")
    if tuple(params) != INPUTS:
        raise ProgramSyntaxError(lineno, f"the parameters must be ({', '.join(INPUTS)}), got ({', '.join(params)})")
    parser.expect(":", "':' at the end of the function header")
    parser.expect_end("the function header")


def _parse_return(tokens: list[_Token], lineno: int) -> None:
    names: list[str] = []
    rest = tokens[1:]
    for index, token in enumerate(rest):
        if index % 2 == 0 and token.kind != "name":
            raise ProgramSyntaxError(lineno, f"return must list variable names, found {token.text!r}")
        if index % 2 == 1 and token.kind != ",":
            raise ProgramSyntaxError(lineno, f"expected ',' between returned names, found {token.text!r}")
        if token.kind == "name":
            names.append(token.text)
    if rest and rest[-1].kind == ",":
        raise ProgramSyntaxError(lineno, "trailing ',' in the return statement")
    if tuple(names) != OUTPUTS:
        raise ProgramSyntaxError(lineno, f"the program must end with {RETURN_LINE!r}, got 'return {', '.join(names)}'")


def parse_program(text: str) -> Program:
    """Parse program text (the :func:`format_program` form) into a :class:`Program`; checks it like
    :func:`check_program`, raising :class:`ProgramSyntaxError` with the offending line."""
    lines = text.splitlines()
    statements: list[Statement] = []
    linenos: list[int] = []
    seen_def = False
    return_line = 0
    for lineno, raw in enumerate(lines, start=1):
        tokens = _tokenize(raw, lineno)
        if not tokens:
            continue
        first = tokens[0]
        if return_line:
            raise ProgramSyntaxError(lineno, f"unexpected text after the return statement (line {return_line})")
        if first.kind == "name" and first.text == "def":
            if seen_def:
                raise ProgramSyntaxError(lineno, "a second 'def' line; a program is one function")
            _parse_def(tokens, lineno)
            seen_def = True
            continue
        if not seen_def:
            raise ProgramSyntaxError(lineno, f"the program must start with {DEF_LINE!r}")
        if first.kind == "name" and first.text == "return":
            _parse_return(tokens, lineno)
            return_line = lineno
            continue
        statements.append(_LineParser(tokens, lineno).statement())
        linenos.append(lineno)
    if not seen_def:
        raise ProgramSyntaxError(1, f"missing the function header {DEF_LINE!r}")
    if not return_line:
        raise ProgramSyntaxError(max(len(lines), 1), f"missing {RETURN_LINE!r} at the end of the program")
    if not statements:
        raise ProgramSyntaxError(return_line, "the program body is empty")
    program = Program(tuple(statements))
    _check(program, linenos, return_line)
    return program


# ---- checking ----------------------------------------------------------------------------------------------


def _arg_type(arg: Arg, types: dict[str, str]) -> str | None:
    if isinstance(arg, Const):
        return "scalar"
    return types.get(arg.name)


def _check(program: Program, linenos: list[int], return_line: int) -> dict[str, str]:
    types = dict(INPUT_TYPES)
    for statement, lineno in zip(program.statements, linenos):
        primitive = PRIMITIVES.get(statement.op)
        if primitive is None:
            raise ProgramSyntaxError(lineno, _unknown_primitive(statement.op))
        if len(statement.args) != primitive.arity:
            raise ProgramSyntaxError(
                lineno,
                f"{statement.op} takes {primitive.arity} argument{'s' if primitive.arity != 1 else ''}, "
                f"got {len(statement.args)}",
            )
        if not statement.target.isidentifier() or statement.target in _KEYWORDS:
            raise ProgramSyntaxError(lineno, f"{statement.target!r} is not a valid variable name")
        if statement.target in NAMED_CONSTANTS or statement.target in _NON_FINITE:
            raise ProgramSyntaxError(lineno, f"cannot assign to the constant {statement.target!r}")
        arg_types: list[str] = []
        for arg in statement.args:
            if isinstance(arg, Var) and arg.name not in types:
                close = difflib.get_close_matches(arg.name, list(types), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ProgramSyntaxError(lineno, f"variable {arg.name!r} is used before it is assigned{hint}")
            arg_types.append(_arg_type(arg, types))
        kind = result_type(statement.op, arg_types)
        if kind is None:
            raise ProgramSyntaxError(
                lineno, f"{statement.op}({', '.join(arg_types)}) is not a valid call: {primitive.doc}"
            )
        types[statement.target] = kind
    if "update" not in types:
        raise ProgramSyntaxError(return_line, "'update' is returned but never assigned")
    return types


def check_program(program: Program) -> dict[str, str]:
    """Check a program given as data; returns the final type of every variable. Raises
    :class:`ProgramSyntaxError` whose line refers to ``format_program(program)``."""
    if not program.statements:
        raise ProgramSyntaxError(2, "the program body is empty")
    linenos = list(range(2, len(program.statements) + 2))
    return _check(program, linenos, len(program.statements) + 2)
