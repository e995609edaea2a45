"""Scorers we did not write, run in a worker process with a time limit: the user's reward, reasoning-gym's scorers.

Model-written text is untrusted, and so is the time a scorer takes on it: a user's ``score(completion, answer)``
may loop forever on some completion, and a scorer may be slow on some text. A thread cannot be stopped, so such
scorers run in one child Python process per task set, kept for the run (:class:`ScorerProcess`):

* the child is ``python -m metaopt.posttrain.rewards`` and loads its scorers once (the user's module through
  :func:`metaopt.user_code.load`, reasoning-gym's datasets by name, options and seed) before it answers;
* every completion is one request, a JSON line ``{"key", "completion", "answer", "index"}`` on its stdin, and one
  JSON line back, ``{"value": <float>}`` or ``{"error": "<one line>"}``: the completion only ever travels as a
  string argument, never as code, and nothing the child sends back is unpickled;
* a scorer that raises, returns something other than a finite number (a bool is not one), or does not answer
  within ``timeout_s`` scores 0.0 and is counted as a failure; a child that hangs is killed (SIGKILL) and a fresh
  one is started for the next request, so a run never waits more than ``timeout_s`` per completion.

Model-written text is never evaluated by a reasoning-gym scorer. Several of them hand the completion to Python's
``eval`` (``eval(answer)`` when it is not the exact answer: ``n_queens``, ``binary_matrix``, ``string_insertion``,
...) or to sympy's ``parse_expr``/``sympify``, which ``eval`` the text (``polynomial_multiplication``,
``puzzle24``, the integration tasks). So once its scorers are imported, a child holding reasoning-gym scorers
installs guards (:func:`install_evaluation_guards`), active only while a reasoning-gym ``score_answer`` runs
(:func:`evaluation_refused`); a guarded call raises :class:`EvaluationRefused` before anything is evaluated:

* ``builtins.eval`` and ``builtins.exec`` given source text (``str``, ``bytes``);
* ``sympy.parsing.sympy_parser.parse_expr`` whatever its input (every ``sympify`` of text ends there), and
  ``sympify`` given text, under their sympy names (``sympy.parse_expr``, ``sympy.sympify``, ...) and every name a
  loaded ``reasoning_gym.*`` module binds them to (``from sympy.parsing.sympy_parser import parse_expr``);
  ``sympify`` of numbers and of expressions the scorer built still works.

Only the dataset entry's own strings pass (the very objects of ``entry``, e.g. ``eval(entry["answer"])`` or the
problem's expression, as the dataset evaluated them when it generated them; a completion equal to the answer is
another object and is refused), and whatever a guarded call that passed does inside (sympy's parser at its own
``eval``). A refusal is reported even when the scorer catches it (the guard remembers it; :class:`EvaluationRefused`
is a ``BaseException``, so ``except Exception`` lets it through): the reply is ``{"error": ..., "refused":
<name>}``, the completion scores 0.0 and counts as a failure, and validation refuses a task whose scorer does this
to its own correct answer before Ray starts (:func:`metaopt.posttrain.tasks.evaluating_gym_task`).

Not covered: ``eval``/``exec`` of a code object (imports run that way; so would ``eval(compile(text))``),
interpreters of text other than these (``ast.literal_eval``, ``json``, a hand-written parser), a single-character
completion (CPython shares those string objects, so one may pass as the entry's own; it cannot name more than one
variable), and generating a problem (``dataset[index]``, which may ``eval`` its own expressions, not guarded). The
guards fail closed: a scorer that, while it runs, builds code from text of its own (``collections.namedtuple``,
``lambdify``) is refused too. The user's own ``reward`` (``module:function``) is the user's code and is not
guarded: it gets the completion as a string and does with it what its author wrote, within the time limit.

The child runs in the user's directory (the ``base`` references are imported from: the folder the user ran
metaopt in, :func:`metaopt.user_code.user_dir` inside a Ray trial, which itself runs in a folder of its own), so a
reward that opens ``"vocab.txt"`` reads the same file in the check before Ray starts and in every trial.

The child's stdout is its reply channel, so it moves the user's prints to stderr. It dies with its parent: SIGKILL
when the thread that started it ends (Linux ``prctl(PR_SET_PDEATHSIG)``, which stops even a scorer stuck in C
code), else when its stdin closes or, checked every second by a watchdog thread, when its parent process is gone.
Its address space is capped (``RLIMIT_AS``, :data:`DEFAULT_MEMORY_MB`, the ``reward_memory_mb`` option), so a
scorer that allocates without bound fails with MemoryError (the completion scores 0) rather than taking the node's
memory; the numeric libraries' thread pools are one thread there unless the user set them (OpenBLAS reserves
memory per thread). A reward that needs more (one that loads a model) raises ``reward_memory_mb`` or sets it null.

A request costs one pipe round trip (about 0.1 ms, see the tests), small beside sampling a completion.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import json
import math
import numbers
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from metaopt.errors import ConfigError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "STARTUP_TIMEOUT_S",
    "EvaluationRefused",
    "Score",
    "ScorerProcess",
    "evaluation_refused",
    "exact_match",
    "install_evaluation_guards",
    "normalise_answer",
    "reward_value_problem",
]

DEFAULT_TIMEOUT_S = 2.0
#: The worker process's address space cap (``RLIMIT_AS``), in MiB: a scorer that allocates without bound fails
#: (a MemoryError, scored 0) instead of taking the node's memory; ``reward_memory_mb`` sets it (None: no cap).
DEFAULT_MEMORY_MB = 4096
STARTUP_TIMEOUT_S = 120.0  # importing reasoning-gym and the user's module, once per child
USER_REWARD_PARAMS = ("completion", "answer")
_MAX_REPLY_BYTES = 1 << 16


def normalise_answer(text: str) -> str:
    """An answer compared by exact match: whitespace runs collapsed to one space, ends stripped (case kept)."""
    return " ".join(str(text).split())


def exact_match(completion_answer: str, answer: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0 (the reward of a dataset without ``reward:``)."""
    return float(normalise_answer(completion_answer) == normalise_answer(answer))


def reward_value_problem(value: Any) -> str | None:
    """Why ``value`` is not a reward (a finite real number, not a bool), or None when it is one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "None" if value is None else f"a {type(value).__name__}"
        return f"returned {kind}; expected a float (a number, not a bool)"
    if not math.isfinite(float(value)):
        return f"returned {float(value)}; expected a finite float"
    return None


@dataclass(frozen=True)
class Score:
    """A scorer's answer: ``value`` (0.0 on failure) and, on failure, one line saying why; ``refused``: the entry
    point (``"sympy parse_expr"``) when the failure is a reasoning-gym scorer that tried to evaluate the text."""

    value: float
    problem: str | None = None
    refused: str | None = None


class ScorerProcess:
    """A child process holding named scorers, started on the first request and kept until :meth:`close`.

    ``scorers``: key -> spec, where a spec is ``{"kind": "user", "reference": "module:function"}`` (called as
    ``fn(completion, answer)``) or ``{"kind": "gym", "name": ..., "options": {...}, "seed": ..., "size": ...}``
    (reasoning-gym's ``score_answer(completion, dataset[index])``, full score or nothing). ``base``: the directory
    user references are imported from and the child runs in (default :func:`metaopt.user_code.user_dir`).
    ``memory_mb``: the child's address-space cap in MiB (None: none).
    """

    def __init__(
        self,
        scorers: Mapping[str, Mapping[str, Any]],
        timeout_s: float,
        base: str | None = None,
        memory_mb: int | None = DEFAULT_MEMORY_MB,
    ):
        from metaopt import user_code

        self.scorers = {key: dict(spec) for key, spec in scorers.items()}
        self.timeout_s = float(timeout_s)
        self.base = str(base) if base is not None else str(user_code.user_dir())
        self.memory_mb = None if memory_mb is None else int(memory_mb)
        self.failures = 0
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        self._buffer = b""

    # ------------------------------------------------------------------------------------------ life cycle
    def _start(self) -> subprocess.Popen:
        command = [
            sys.executable,
            "-P",  # the user's folder (the child's cwd) does not shadow the modules metaopt imports
            "-m",
            "metaopt.posttrain.rewards",
            json.dumps(self.scorers),
            self.base,
            json.dumps({"parent": os.getpid(), "memory_mb": self.memory_mb}),
        ]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            bufsize=0,
            cwd=self.base if os.path.isdir(self.base) else None,  # the user's relative paths, as in their folder
            env=_child_environment(),
        )
        self._process, self._buffer = process, b""
        reply = self._read_reply(time.monotonic() + STARTUP_TIMEOUT_S)
        if reply is None or "error" in reply or not reply.get("ready"):
            self.close()
            problem = "did not start" if reply is None else reply.get("error", "did not start")
            raise ConfigError("", str(problem))
        return process

    def close(self) -> None:
        """Stop the child (kill: it may be stuck in a scorer). A process set dropped without it still ends its child:
        the pipes close with it, and the child exits at the end of its stdin."""
        process, self._process = self._process, None
        if process is None:
            return
        for stream in (process.stdin, process.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        if process.poll() is None:
            process.kill()
        process.wait()

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, key: str, completion: str, answer: str, index: int | None = None) -> Score:
        """The scorer ``key`` on one completion, within ``timeout_s``; 0.0 and a counted failure otherwise."""
        process = self._process if self._process is not None and self._process.poll() is None else self._start()
        request = json.dumps({"key": key, "completion": completion, "answer": answer, "index": index}) + "\n"
        try:
            process.stdin.write(request.encode("utf-8"))
        except (BrokenPipeError, OSError):
            self.close()
            return self._failed("the reward process exited")
        reply = self._read_reply(time.monotonic() + self.timeout_s)
        if reply is None:
            self.close()  # stuck (or dead): kill it; the next request starts a fresh one
            self.restarts += 1
            return self._failed(f"did not answer within reward_timeout_s={self.timeout_s:g}")
        if "error" in reply:
            refused = reply.get("refused")
            return self._failed(str(reply["error"]), refused if isinstance(refused, str) else None)
        return Score(float(reply["value"]))

    def _failed(self, problem: str, refused: str | None = None) -> Score:
        self.failures += 1
        return Score(0.0, problem, refused)

    def _read_reply(self, deadline: float) -> dict[str, Any] | None:
        """One JSON line from the child before ``deadline``; None on timeout, end of stream or garbage."""
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(self._buffer) > _MAX_REPLY_BYTES:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 14)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            return None
        return reply if isinstance(reply, dict) else None


# ---------------------------------------------------------------------------------------------- the guards


class EvaluationRefused(BaseException):
    """A reasoning-gym scorer called ``name`` (``"eval"``, ``"sympy parse_expr"``, ...) on text while guarded.

    A ``BaseException``, like ``KeyboardInterrupt``: reasoning-gym's scorers wrap their work in ``except
    Exception`` (scoring 0.0), which must not hide the refusal (a bare ``except`` that does is still caught by
    :func:`evaluation_refused`, which remembers the refusal)."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(
            f"the scorer tried to evaluate the completion with {name}; metaopt never evaluates model-written text"
        )


class _Guard:
    """The guards' state: refusing only inside :func:`evaluation_refused` (``active``), where ``own`` holds the
    dataset entry's own strings (the objects themselves, compared with ``is`` and kept alive here: an id alone
    could be reused by a new string once the scorer dropped the entry's), ``trusted`` counts guarded calls under
    way on such a string (what sympy's parser does with it inside), and ``refused`` remembers the first refusal."""

    active = False
    own: tuple[str, ...] = ()
    trusted = 0
    refused: str | None = None


def _own_strings(value: Any) -> Iterator[str]:
    """The strings in a reasoning-gym entry (its answer, its metadata's expressions), nested containers included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _own_strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _own_strings(item)


@contextlib.contextmanager
def evaluation_refused(entry: Any = None) -> Iterator[None]:
    """Run a reasoning-gym scorer with the guards active: a guarded call on text raises
    :class:`EvaluationRefused`, and is raised again on leaving even if the scorer caught it; the strings of
    ``entry`` itself (the very objects, not equal text: a completion equal to the answer is still refused) may be
    evaluated, as when the dataset generated them. Needs :func:`install_evaluation_guards` first."""
    own = tuple(_own_strings(entry))
    _Guard.active, _Guard.own, _Guard.trusted, _Guard.refused = True, own, 0, None
    try:
        yield
    finally:
        refused = _Guard.refused
        _Guard.active, _Guard.own, _Guard.trusted, _Guard.refused = False, (), 0, None
        if refused is not None:
            raise EvaluationRefused(refused)


def _text(value: Any) -> bool:
    return isinstance(value, str | bytes | bytearray)


def _guarded(original: Callable, name: str, keyword: str | None, *, any_input: bool = False) -> Callable:
    """``original`` refusing, while guarded, to run on text that is not the entry's own (its first argument, or
    ``keyword``); ``any_input``: refuse whatever the input is (a parser of text), else only text (``eval`` of a
    code object, ``sympify`` of a number or an expression pass)."""

    @functools.wraps(original)
    def guarded(*args, **kwargs):
        if not _Guard.active or _Guard.trusted:
            return original(*args, **kwargs)
        text = args[0] if args else kwargs.get(keyword) if keyword else None
        if not any_input and not _text(text):
            return original(*args, **kwargs)
        if not any(text is own for own in _Guard.own):
            _Guard.refused = _Guard.refused or name
            raise EvaluationRefused(name)
        _Guard.trusted += 1
        try:
            return original(*args, **kwargs)
        finally:
            _Guard.trusted -= 1

    return guarded


def install_evaluation_guards() -> None:
    """Replace ``builtins.eval``/``exec`` and sympy's ``parse_expr``/``sympify`` by guarded versions (inactive
    outside :func:`evaluation_refused`), under their own names and every name an imported ``reasoning_gym``
    module binds them to. Once per process, after the scorers are imported; idempotent."""
    import sympy
    import sympy.parsing.sympy_parser

    parser, converter = sys.modules["sympy.parsing.sympy_parser"], sys.modules["sympy.core.sympify"]
    if hasattr(builtins.eval, "__wrapped__"):
        return  # installed already
    guards = {  # by identity
        id(builtins.eval): _guarded(builtins.eval, "eval", None),
        id(builtins.exec): _guarded(builtins.exec, "exec", None),
        id(parser.parse_expr): _guarded(parser.parse_expr, "sympy parse_expr", "s", any_input=True),
        id(converter.sympify): _guarded(converter.sympify, "sympy sympify", "a"),
    }
    builtins.eval, builtins.exec = guards[id(builtins.eval)], guards[id(builtins.exec)]
    modules = [sympy, sympy.core, converter, sympy.parsing, parser]
    modules += [module for name, module in list(sys.modules.items()) if name.split(".")[0] == "reasoning_gym"]
    for module in modules:
        for attribute, value in list(vars(module).items()):
            if id(value) in guards:
                setattr(module, attribute, guards[id(value)])


# ---------------------------------------------------------------------------------------------- the child side


def _user_scorer(spec: Mapping[str, Any], base: str) -> Callable[[str, str, int | None], float]:
    from metaopt import user_code

    reference = spec["reference"]
    function = user_code.load_callable(reference, USER_REWARD_PARAMS, base=base)
    return lambda completion, answer, index: function(completion, answer)


def _gym_scorer(spec: Mapping[str, Any]) -> Callable[[str, str, int | None], float]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(spec["name"], size=spec["size"], seed=spec["seed"], **spec["options"])

    def score(completion: str, answer: str, index: int | None) -> float:
        entry = dataset[int(index)]  # generating may eval the dataset's own expressions: not guarded
        with evaluation_refused(entry):
            value = dataset.score_answer(completion, entry)
        return float(value >= 1.0)

    return score


def _answer(scorer: Callable[[str, str, int | None], float], request: Mapping[str, Any]) -> dict[str, Any]:
    try:
        value = scorer(request["completion"], request["answer"], request.get("index"))
    except EvaluationRefused as refused:
        return {"error": str(refused), "refused": refused.name}
    except Exception as err:  # the scorer's own error: one line back, the child goes on
        text = str(err).strip().splitlines()
        return {"error": f"raised {type(err).__name__}" + (f": {text[0][:200]}" if text else "")}
    problem = reward_value_problem(value)
    return {"error": problem} if problem else {"value": float(value)}


#: Thread pools of numeric libraries sized to one thread in the worker process (a scorer runs one completion at a
#: time; OpenBLAS reserves memory per thread, which the address-space cap would count), unless the user set them.
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: Linux's ``prctl`` option asking for a signal when the parent dies (``<linux/prctl.h>``).
_PR_SET_PDEATHSIG = 1


def _child_environment() -> dict[str, str]:
    return {**dict.fromkeys(_ONE_THREAD, "1"), **os.environ}


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the thread that started it ends (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere,
    or where libc is not found, only the watchdog thread of :func:`_watch_parent` does it). A parent that died
    before the request was made leaves this process to init: it exits now."""
    if sys.platform.startswith("linux"):
        import ctypes
        import ctypes.util
        import signal

        with contextlib.suppress(OSError, AttributeError, TypeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def _cap_memory(memory_mb: int | None) -> None:
    """Cap this process's address space at ``memory_mb`` MiB (``RLIMIT_AS``; None, or a platform without
    :mod:`resource`: no cap). An allocation over it raises MemoryError in the scorer: the completion scores 0."""
    if memory_mb is None:
        return
    try:
        import resource
    except ImportError:  # not POSIX
        return
    limit = memory_mb << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def serve(
    scorer_specs: Mapping[str, Mapping[str, Any]],
    base: str,
    parent: int | None = None,
    memory_mb: int | None = DEFAULT_MEMORY_MB,
) -> None:
    """The child's loop: bind its life to ``parent``'s (default: the process that started it) and cap its memory,
    load the scorers, say ready, answer one JSON line per request until stdin closes."""
    parent = os.getppid() if parent is None else parent
    _die_with_parent(parent)
    _cap_memory(memory_mb)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the user's prints go to stderr, never into the reply channel
    sys.stdout = sys.stderr
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        scorers = {
            key: _user_scorer(spec, base) if spec["kind"] == "user" else _gym_scorer(spec)
            for key, spec in scorer_specs.items()
        }
        if any(spec["kind"] == "gym" for spec in scorer_specs.values()):
            install_evaluation_guards()  # after every import: guarded while a reasoning-gym scorer runs
    except Exception as err:
        replies.write(json.dumps({"error": str(err).strip().splitlines()[0] if str(err).strip() else repr(err)}) + "\n")
        return
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        scorer = scorers.get(request.get("key"))
        reply = {"error": f"no scorer {request.get('key')!r}"} if scorer is None else _answer(scorer, request)
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    _limits = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    serve(json.loads(sys.argv[1]), sys.argv[2], _limits.get("parent"), _limits.get("memory_mb", DEFAULT_MEMORY_MB))
