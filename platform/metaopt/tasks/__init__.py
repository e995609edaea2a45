"""Learning problems shared by every capability; each meets :class:`metaopt.tasks.base.TrainingTask`."""

from __future__ import annotations

from typing import Any

from metaopt.errors import ConfigError
from metaopt.tasks.base import Schedule, TrainingTask

# name -> "module:Class", imported lazily so choosing digits never imports RLlib.
TASKS = {
    "digits": "metaopt.tasks.digits:DigitsTask",
    "cartpole_rllib": "metaopt.tasks.rllib_ppo:RLlibPPOTask",
    "tiny_lm": "metaopt.tasks.tiny_lm:TinyLMTask",
}


def build_task(name: str, options: dict[str, Any], optimizer: dict[str, Any], seed: int) -> TrainingTask:
    """Instantiate a registered task; unknown names are a ConfigError listing the valid ones."""
    import importlib

    if name not in TASKS:
        raise ConfigError("task", f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(options, optimizer, seed)


__all__ = ["TASKS", "Schedule", "TrainingTask", "build_task"]
