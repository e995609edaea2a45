"""Ctrl-C and ``ray job stop`` end a sweep the way Tune ends it on Ctrl-C: trials stop, their state is saved, and
the sweep reports itself as stopped (MLflow runs KILLED, exit status 128 + the signal) instead of complete.

Tune (2.60) catches the first SIGINT during ``tuner.fit()`` itself, stops every trial and returns with the
unfinished trials; a second SIGINT falls through to the handler that was there before (ours). SIGTERM, what
``ray job stop`` and most process managers send, would end the process at once (``ray.init`` installs a handler
that exits), leaving every MLflow run RUNNING. :func:`arm` therefore installs, after Ray is up, handlers that

* record which signal arrived (:func:`received`), so the sweep's end can say why it stopped;
* hand a SIGTERM to whatever handles SIGINT at that moment -- Tune's graceful stop during ``fit()``,
  else a :class:`KeyboardInterrupt` -- so both signals take the same path.

Only the command line arms them (:func:`enable`); library callers keep Python's and Tune's defaults.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

# What signal.getsignal returns and signal.signal takes: a handler, SIG_DFL/SIG_IGN (ints), None (set outside Python)
_Handler = Callable[[int, FrameType | None], Any] | int | None

_enabled = False
_received: list[int] = []
_before: dict[int, _Handler] = {}  # the handlers arm() replaced, for disable()


def enable() -> None:
    """Let :func:`arm` install the handlers in this process (``metaopt run`` calls it once)."""
    global _enabled
    _enabled = True
    _received.clear()


def disable() -> None:
    """Put back the handlers :func:`arm` replaced and forget what was received (``metaopt run`` in a test)."""
    global _enabled
    _enabled = False
    _received.clear()
    if threading.current_thread() is threading.main_thread():
        for signum, handler in _before.items():
            signal.signal(signum, handler)
    _before.clear()


def received() -> int | None:
    """The first stop signal this process received since it was armed, else None."""
    return _received[0] if _received else None


def exit_code(signum: int | None) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 for SIGINT)."""
    return 128 + int(signum or signal.SIGINT)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum or signal.SIGINT).name


def _on_sigint(signum, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def _on_sigterm(signum, frame) -> None:
    _received.append(signum)
    current = signal.getsignal(signal.SIGINT)
    if callable(current) and current is not _on_sigint and current is not signal.default_int_handler:
        current(signal.SIGINT, frame)  # Tune's handler during fit(): it stops the trials and returns
        return
    raise KeyboardInterrupt


def after_fit() -> None:
    """Call when ``tuner.fit()`` returns. Tune puts our SIGINT handler back only when it caught a Ctrl-C: so if
    ours is in place again, record a SIGINT. Then re-arm (after a normal fit, Tune's handler is still set)."""
    tune_handles = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") in ("", "0")
    if _armed() and tune_handles and signal.getsignal(signal.SIGINT) is _on_sigint and not _received:
        _received.append(signal.SIGINT)
    arm()


def _armed() -> bool:
    return _enabled and threading.current_thread() is threading.main_thread() and signal.SIGINT in _before


@contextmanager
def deferred() -> Iterator[None]:
    """Inside: a SIGINT or SIGTERM is only recorded, so the code that ends MLflow runs is not cut short by a
    second Ctrl-C; the armed handlers come back afterwards (a no-op where nothing is armed)."""
    if not _armed():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in saved:
        signal.signal(signum, lambda number, frame: _received.append(number))
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def arm() -> None:
    """Install the handlers (main thread only, and only once enabled). Call after ``ray.init``, which installs
    its own SIGTERM handler, and again after ``tuner.fit()``, which leaves Tune's SIGINT handler in place when
    no signal came (a later Ctrl-C would only set Tune's stale flag)."""
    if not _enabled or threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in ((signal.SIGINT, _on_sigint), (signal.SIGTERM, _on_sigterm)):
        _before.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, handler)
