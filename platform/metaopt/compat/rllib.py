"""RLlib's private internals, behind one door (written against ``ray[rllib]==2.60.*``, new API stack, torch).

Used by :mod:`metaopt.tasks.rllib_ppo`, where an outer loop (PBT) owns the learning rate:

- ``set_learner_lr`` / ``learner_lrs``: a Learner's torch optimizers live in ``Learner._named_optimizers``, each
  registered with a ``Scheduler`` (built from ``config.lr``) in ``Learner._optimizer_lr_schedules``, which RLlib
  re-applies after every update (``after_gradient_based_update``). We replace that scheduler by a fixed-value one
  holding our rate, and write the rate with ``_set_optimizer_lr``. No fallback: through public API alone (torch's
  ``param_groups``) RLlib puts ``config.lr`` back after the first update of each iteration, so an outer loop would
  tune a rate that is not used. Where the internals are not usable, setting the rate is a one-line
  :class:`~metaopt.errors.ConfigError` naming the Ray version found and the one supported; reading it back
  (``learner_lrs``) uses torch's ``param_groups`` there, which is exact.
- ``restorable_state``: RLlib ignores incoming weights whose ``weights_seq_no`` is not newer than the version a
  Learner or EnvRunner holds (their private ``_weights_seq_no``); a PBT exploit restores an *older* state into a
  trial that trained longer, so we reset that counter on every Learner and EnvRunner. Fallback: the same effect
  through the public state format: every ``weights_seq_no`` in the state to restore is set to 0, which RLlib
  reads as "force this update".
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from metaopt import compat
from metaopt.compat import private_api_usable, version_matches, warn_fallback
from metaopt.errors import ConfigError

WRITTEN_FOR = "==2.60.*"
"""The Ray versions (``ray`` distribution, which ships RLlib) whose private internals this module uses."""

_LR_INTERNALS = ("_named_optimizers", "_optimizer_lr_schedules", "_set_optimizer_lr", "_get_optimizer_lr")
_WEIGHTS_VERSION = "_weights_seq_no"


def _lr_internals_usable(learner: Any) -> bool:
    return private_api_usable("ray", WRITTEN_FOR, *((learner, name) for name in _LR_INTERNALS))


def unsupported_rllib_problem(learner: Any) -> str:
    """Why this RLlib cannot take a learning rate from an outer loop, in one line: the version found (or, on
    the supported version, the private names its Learner lacks) and the version supported."""
    found = f"found RLlib {compat.installed_version('ray') or '(version unreadable)'}"
    if version_matches("ray", WRITTEN_FOR):
        found += f" without Learner.{', Learner.'.join(n for n in _LR_INTERNALS if not hasattr(learner, n))}"
    return (
        f"{found}; setting its learning rate from an outer loop needs ray[rllib]{WRITTEN_FOR} (elsewhere RLlib "
        f"puts config.lr back after each update): pip install 'ray[rllib]{WRITTEN_FOR}'"
    )


def public_optimizers(learner: Any) -> dict[str, Any]:
    """``{module_id}_{optimizer_name} -> torch optimizer`` for every module of the Learner, through its public API."""
    return {
        f"{module_id}_{name}": optimizer
        for module_id in learner.module.keys()  # noqa: SIM118 -- a MultiRLModule, whose public API is keys()
        for name, optimizer in learner.get_optimizers_for_module(module_id)
    }


def set_learner_lr(learner: Any, lr: float) -> None:
    """Runs on every Learner: use ``lr`` for the next updates and keep RLlib from reverting it; a ConfigError
    on ``ray[rllib]`` where this Ray's internals are not the ones we know (see the module docstring)."""
    if not _lr_internals_usable(learner):
        raise ConfigError("ray[rllib]", unsupported_rllib_problem(learner))
    from ray.rllib.utils.schedules.scheduler import Scheduler

    for optimizer in learner._named_optimizers.values():
        learner._optimizer_lr_schedules[optimizer] = Scheduler(fixed_value_or_schedule=lr)
        learner._set_optimizer_lr(optimizer, lr)


def learner_lrs(learner: Any) -> dict[str, float]:
    """Runs on every Learner: the rate each optimizer will use (its first ``param_group``)."""
    if not _lr_internals_usable(learner):
        return {name: float(optimizer.param_groups[0]["lr"]) for name, optimizer in public_optimizers(learner).items()}
    return {name: float(learner._get_optimizer_lr(opt)) for name, opt in learner._named_optimizers.items()}


def forget_weights_version(component: Any) -> bool:
    """Runs on every Learner and EnvRunner: forget which weights version it holds; False where it has no such
    counter we know."""
    if not private_api_usable("ray", WRITTEN_FOR, (component, _WEIGHTS_VERSION)):
        return False
    setattr(component, _WEIGHTS_VERSION, 0)
    return True


def weights_seq_no_key() -> str:
    """The state key of a weights version: RLlib's ``WEIGHTS_SEQ_NO`` where RLlib is loaded (it is, wherever an
    Algorithm is restored), else its value in RLlib 2.60; importing RLlib (seconds) for one string is not worth it."""
    metrics = sys.modules.get("ray.rllib.utils.metrics")
    return str(getattr(metrics, "WEIGHTS_SEQ_NO", "weights_seq_no"))


def with_weights_forced(state: Any, key: str | None = None) -> Any:
    """A copy of an RLlib state (nested dicts) with every ``weights_seq_no`` set to 0: RLlib then loads those
    weights whatever version the receiver holds."""
    key = key or weights_seq_no_key()
    if not isinstance(state, dict):
        return state
    return {name: 0 if name == key else with_weights_forced(value, key) for name, value in state.items()}


def _gathered(results: Iterable[Any]) -> list[Any]:
    values = []
    for call in results:
        if not call.ok:
            raise call.get()
        values.append(call.get())
    return values


def restorable_state(algo: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Prepare ``algo`` to load ``state`` (``Algorithm.get_state()`` output, maybe of an older run than ``algo``'s
    own) and return the state to pass to ``algo.set_state``: every Learner and EnvRunner will take its weights."""
    if version_matches("ray", WRITTEN_FOR):
        learners = _gathered(algo.learner_group.foreach_learner(forget_weights_version))
        runners = algo.env_runner_group.foreach_env_runner(forget_weights_version)
        if all(learners) and all(runners):
            return state
    warn_fallback(
        "rllib.weights_version",
        f"metaopt.compat.rllib: RLlib's private weights version is not usable on this Ray version (written "
        f"for ray{WRITTEN_FOR}): restoring with every weights_seq_no of the state set to 0",
    )
    return with_weights_forced(state)
