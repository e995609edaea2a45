"""Optional dependencies: which pip extra brings which modules, and one clear error line when one is missing.

Heavy packages that only one capability or option needs (RLlib's own dependencies, GPy for PB2, the language-model
stack for post-training) are extras of the ``metaopt-platform`` distribution, not core dependencies. Code that needs
one calls :func:`require` where the user's choice is validated (an experiment section, a task name), so a missing
extra is the usual ``field: problem`` line naming the extra and the pip command, not an ImportError from deep inside
a Ray worker minutes later.

The check only *finds* modules (:func:`importlib.util.find_spec` on top-level names); it imports nothing, so it is
cheap enough to call on every validation.

An extra is needed where the experiment runs. ``metaopt run`` validates with the validation context's
``check_paths`` true (:func:`metaopt.config.from_dict`): it runs here, so the extra must be installed here.
``metaopt submit`` and ``metaopt list`` validate with it false: the cluster has its own packages, and this machine
need not have the ones only the cluster runs.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from typing import Any

from metaopt.errors import ConfigError

DISTRIBUTION = "metaopt-platform"

#: extra -> the top-level modules it provides that the core install lacks. Kept in step with
#: ``[project.optional-dependencies]`` in pyproject.toml (tests/test_extras.py checks the two agree).
EXTRAS: dict[str, tuple[str, ...]] = {
    # ray[rllib] adds these to ray[default,tune]; RLlib's own code ships in the ray wheel, so it is always findable.
    # gymnasium: the environments RLlib trains on (metaopt.tasks.options imports it to check an env id).
    "rllib": ("tree", "lz4", "ormsgpack", "gymnasium"),
    # Tune's PB2 scheduler fits a GP bandit with GPy (Parker-Holder et al. 2020).
    "pb2": ("GPy",),
    # Language-model policies and the reasoning tasks of the post-training capability; trl is a test-only oracle.
    "posttrain": ("transformers", "tokenizers", "reasoning_gym"),
}


def is_installed(module: str) -> bool:
    """Whether a top-level ``module`` can be imported, found on ``sys.path`` without importing it."""
    if module in sys.modules:  # already imported (or stubbed by a test): find_spec would fail on a None __spec__
        return True
    return importlib.util.find_spec(module) is not None


def missing_module(extra: str) -> str | None:
    """The first module of ``extra`` that is not installed, or None when the whole extra is there."""
    if extra not in EXTRAS:
        # A typo in our own code, not bad user input: fail loudly rather than silently pass the check.
        raise ValueError(f"unknown extra {extra!r}; known extras: {', '.join(sorted(EXTRAS))}")
    return next((module for module in EXTRAS[extra] if not is_installed(module)), None)


def install_command(extra: str) -> str:
    """The pip command that installs ``extra`` (quoted for shells that expand brackets, such as zsh)."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def runs_here(context: Mapping[str, Any] | None) -> bool:
    """Whether the experiment under validation runs on this machine, given pydantic's validation context.

    Only an explicit ``check_paths`` false (``metaopt submit``, ``metaopt list``) means it runs elsewhere; with no
    context (a model built in code, a trial rebuilding its task) the code runs here and now."""
    return context is None or bool(context.get("check_paths", True))


def require(extra: str, field: str, context: Mapping[str, Any] | None = None) -> None:
    """Raise a one-line :class:`ConfigError` on ``field`` when a module of ``extra`` is not installed and the
    experiment runs here (:func:`runs_here` of the validation ``context``).

    ``field`` is the user-facing option whose value needs the extra (``pbt.scheduler``), so the line reads
    ``pbt.scheduler: needs the optional dependencies of metaopt-platform[pb2] (GPy is not installed): pip install
    'metaopt-platform[pb2]'``."""
    module = missing_module(extra)  # first: an unknown extra is our bug, wherever the experiment runs
    if module is not None and runs_here(context):
        raise ConfigError(
            field,
            f"needs the optional dependencies of {DISTRIBUTION}[{extra}] ({module} is not installed): "
            f"{install_command(extra)}",
        )
