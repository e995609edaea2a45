"""One door per library for what we take from its *private* internals.

Ray, Tune, MLflow, RLlib and TRL each have a module here (``compat.ray``, ``compat.tune``, ``compat.mlflow``,
``compat.rllib``, ``compat.trl``) and nothing else in ``metaopt`` touches their underscored names. Each module
says which versions of the library it was written against (``WRITTEN_FOR``) and, once per process, checks the
installed version and the presence of the private name it needs. On a version it was not written for, or when
the name is gone, it logs one warning line and takes a plain fallback built on public API only: slower or less
exact, never wrong. Where no public API can do the job right (RLlib has none that sets a learner's learning
rate for good), the door refuses with one line naming the supported version instead of guessing.
``tests/test_compat.py`` runs every fallback and every refusal.

This module holds the two pieces every door shares: the version check and the once-only warning.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

_warned: set[str] = set()


@functools.cache
def installed_version(distribution: str) -> Version | None:
    """The installed version of a distribution, or None when it is missing or its version is unreadable."""
    try:
        return Version(importlib.metadata.version(distribution))
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return None


def version_matches(distribution: str, specifier: str) -> bool:
    """Whether the installed ``distribution`` satisfies ``specifier`` (e.g. ``"==2.60.*"``)."""
    version = installed_version(distribution)
    return version is not None and version in SpecifierSet(specifier)


def private_api_usable(distribution: str, specifier: str, *holders_and_names: tuple[object, str]) -> bool:
    """True when the installed version is one we were written for and every ``(holder, name)`` exists.

    Both conditions are needed: a private name can survive a release with a different meaning, and a
    patch release can drop one without a version bump we would notice.
    """
    return version_matches(distribution, specifier) and all(hasattr(holder, name) for holder, name in holders_and_names)


def warn_fallback(key: str, message: str) -> None:
    """Say ``message`` once per process for ``key``: one line on stderr naming the fallback in use and its cost.

    stderr, as metaopt's other warnings: it reaches the terminal from the driver and, through Ray's log
    forwarding, from a trial's or worker's process too.
    """
    if key in _warned:
        return
    _warned.add(key)
    print(f"[metaopt] warning: {message}", file=sys.stderr, flush=True)


def reset_for_tests() -> None:
    """Forget the cached versions and the warnings already given, so a test can replay the checks."""
    installed_version.cache_clear()
    _warned.clear()
