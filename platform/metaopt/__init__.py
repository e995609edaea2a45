"""metaopt: adapt the learning process itself, on Ray, tracked in MLflow.

From Python (:mod:`metaopt.api`): ``metaopt.run(experiment)`` runs a YAML file, a dict or a typed Experiment and
returns a :class:`~metaopt.api.Result`; ``from metaopt.api import pbt, federated, learned_objective, symbolic,
posttrain`` gives one function per capability, taking the section's fields with the researcher's own code as
Python objects (``metaopt.pbt`` and the like are the capabilities' packages, so those functions live in
``metaopt.api``). Everything here is loaded on first use (PEP 562): ``import metaopt`` imports neither Ray nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Names this package offers from :mod:`metaopt.api`, :mod:`metaopt.errors` and :mod:`metaopt.session`.
_API = {
    "run": "metaopt.api",
    "load": "metaopt.api",
    "experiment": "metaopt.api",
    "run_kind": "metaopt.api",
    "Result": "metaopt.api",
    "ConfigError": "metaopt.errors",
    "SweepStopped": "metaopt.session",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'metaopt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
