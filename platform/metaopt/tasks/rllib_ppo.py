"""RLlib PPO on a gymnasium environment (default ``CartPole-v1``) as a :class:`TrainingTask`.

An outer loop (Ray Tune PBT) owns the learning rate; RLlib owns everything else.

**What one step is.** For reinforcement learning a *step* of this task is one RLlib
training iteration, i.e. one ``Algorithm.train()`` call: sample ``train_batch_size``
environment steps, then run ``num_epochs`` passes of minibatch SGD over them. The
x-axis of every learning-rate schedule given to :meth:`RLlibPPOTask.train` is therefore
*training iterations*, not gradient updates or environment steps.

**How the learning rate is set (RLlib new API stack; the private parts are in
:mod:`metaopt.compat.rllib`).** The Learner's torch optimizers live in ``Learner._named_optimizers``;
each was registered with an RLlib :class:`~ray.rllib.utils.schedules.scheduler.Scheduler` (built from ``config.lr``) in
``Learner._optimizer_lr_schedules``. RLlib applies that scheduler's value in
``Learner.after_gradient_based_update()``, i.e. *after* every update, which would put
``config.lr`` back into the optimizer. So before each iteration, on every Learner (via
``LearnerGroup.foreach_learner``, which also reaches remote Learners), we write the new
rate into every optimizer's ``param_groups`` *and* replace its scheduler by a fixed-value
``Scheduler`` holding the same rate. The update uses our rate, RLlib's post-update hook
re-applies our rate, and RLlib logs it as ``default_optimizer_learning_rate``.

**Processes.** By default everything runs in the calling process (``num_learners=0``
and ``num_env_runners=0``), which is what a Tune trial actor on a small machine wants:
the task asks Ray for no extra actors or CPUs. Ray must be initialised by the caller
(a Tune trial always is); if it is not, a local Ray without dashboard is started.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from typing import Any

from metaopt.compat import rllib as compat_rllib
from metaopt.optim import Schedule
from metaopt.tasks.options import PPOOptions

OPTIONS_FIELD = "pbt.task_options"  # what errors name when the task is built outside a section
OPTIMIZER_FIELD = "pbt.optimizer"
STATE_FORMAT = 1

# RLlib needs *a* learning rate to build its optimizers; every train() call overwrites
# it with lr_at(step) before the first update, so this value is never trained with.
_BUILD_LR = 3e-4
# Options that define the network and the data; a state saved under different values
# cannot be loaded (the weights would not fit or would mean something else).
_STATE_DEFINING_OPTIONS = ("env", "fcnet_hiddens")


# ------------------------------------------------------------------ RLlib plumbing


def build_ppo_config(options: PPOOptions, seed: int):
    """The PPOConfig (new API stack) for these options, with the Learner in this process."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    return (
        PPOConfig()
        .environment(options.env)
        # 0 remote EnvRunners: sample in the local process (no extra actors inside a Tune trial).
        .env_runners(num_env_runners=options.num_env_runners)
        # 0 remote Learners: the Learner and its optimizer live here, so setting the lr is a local call.
        .learners(num_learners=0)
        .training(
            lr=_BUILD_LR,
            train_batch_size_per_learner=options.train_batch_size,
            minibatch_size=options.minibatch_size,
            num_epochs=options.num_epochs,
            gamma=options.gamma,
        )
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=list(options.fcnet_hiddens)))
        .debugging(seed=seed)
    )


def _gather(results: Any) -> list[Any]:
    """Values of a ``foreach_learner`` call; a failure on any Learner is raised here."""
    values = []
    for call in results:
        if not call.ok:
            raise call.get()
        values.append(call.get())
    return values


def _ensure_ray() -> None:
    """Start a small local Ray only if the caller has not (a Tune trial always has)."""
    import ray

    if not ray.is_initialized():
        # RLlib would otherwise auto-start a full local Ray, dashboard included.
        ray.init(include_dashboard=False)


def _as_float(value: Any) -> float:
    """A metric as a float; missing or non-numeric values (no episode finished yet) become NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def metrics_from_result(result: Mapping[str, Any]) -> dict[str, float]:
    """The flat float metrics of one ``Algorithm.train()`` result (new API stack layout).

    Deliberately no ``training_iteration``: a Tune trainable passing these metrics on would
    override Tune's own iteration counter, which PBT uses as its clock.
    """
    from ray.rllib.core import DEFAULT_MODULE_ID

    runners = result.get("env_runners", {})
    learner = result.get("learners", {}).get(DEFAULT_MODULE_ID, {})
    return {
        "episode_return_mean": _as_float(runners.get("episode_return_mean")),
        "episode_len_mean": _as_float(runners.get("episode_len_mean")),
        "loss": _as_float(learner.get("total_loss")),
        "policy_loss": _as_float(learner.get("policy_loss")),
        "vf_loss": _as_float(learner.get("vf_loss")),
        "entropy": _as_float(learner.get("entropy")),
        # What the Learner reports having used, i.e. our rate unless something overrode it.
        "lr": _as_float(learner.get("default_optimizer_learning_rate")),
        "num_env_steps_sampled_lifetime": _as_float(
            result.get("num_env_steps_sampled_lifetime", runners.get("num_env_steps_sampled_lifetime"))
        ),
    }


_EMPTY_METRICS = dict.fromkeys(
    (
        "episode_return_mean",
        "episode_len_mean",
        "loss",
        "policy_loss",
        "vf_loss",
        "entropy",
        "lr",
        "num_env_steps_sampled_lifetime",
    ),
    math.nan,
)


# ----------------------------------------------------------------------------- task


class RLlibPPOTask:
    """TrainingTask: RLlib PPO; score = mean episode return (higher is better).

    One step = one ``Algorithm.train()`` iteration (see the module docstring). ``options``
    are :class:`~metaopt.tasks.options.PPOOptions`, ``optimizer`` is ``{"name": "adam"}`` (see
    :class:`~metaopt.tasks.options.RLlibOptimizerSpec`), ``seed`` seeds RLlib (envs, torch). Call :meth:`close`
    (or use ``with``) to stop the RLlib algorithm.
    """

    metric = "episode_return_mean"
    mode = "max"
    # Only a NaN/inf loss counts as diverged: PPO's total loss includes the value loss,
    # which grows with the returns as training *succeeds*, so no finite threshold fits.
    divergence_loss: float | None = None

    def __init__(self, options: dict[str, Any], optimizer: dict[str, Any], seed: int):
        # Validate everything before starting anything, so bad input costs no Ray start.
        from metaopt.tasks import parse_task_optimizer, parse_task_options

        self.options = parse_task_options("cartpole_rllib", options, OPTIONS_FIELD)
        self.optimizer_name = parse_task_optimizer("cartpole_rllib", optimizer, OPTIMIZER_FIELD).name
        self.seed = int(seed)
        _ensure_ray()
        self.algo = build_ppo_config(self.options, self.seed).build_algo()
        self._step = 0
        self._last_metrics: dict[str, float] = dict(_EMPTY_METRICS)

    @property
    def step(self) -> int:
        """Training iterations taken so far (the x-axis of the learning-rate schedule)."""
        return self._step

    def train(self, num_steps: int, lr_at: Schedule) -> dict[str, float]:
        """Run ``num_steps`` training iterations, iteration ``s`` with learning rate ``lr_at(s)``.

        Returns the last iteration's metrics, except ``loss``, which is the mean PPO total
        loss over this call's iterations (NaN if any was NaN: reported, not raised).
        ``episode_return_mean`` is RLlib's moving mean over recent episodes (NaN until an
        episode has finished).
        """
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        losses = []
        for _ in range(num_steps):
            self.set_learning_rate(lr_at(self._step))
            self._last_metrics = metrics_from_result(self.algo.train())
            self._step += 1
            losses.append(self._last_metrics["loss"])
        metrics = dict(self._last_metrics)
        if losses:
            metrics["loss"] = sum(losses) / len(losses)
        return metrics

    def set_learning_rate(self, lr: float) -> None:
        """Make every Learner optimizer use ``lr`` from its next update on (until set again)."""
        lr = float(lr)
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr!r}")
        _gather(self.algo.learner_group.foreach_learner(compat_rllib.set_learner_lr, lr=lr))

    def learning_rates(self) -> list[float]:
        """The rate every optimizer of every Learner currently holds (read back from torch)."""
        per_learner = _gather(self.algo.learner_group.foreach_learner(compat_rllib.learner_lrs))
        return [lr for rates in per_learner for lr in rates.values()]

    def weights(self) -> dict[str, Any]:
        """The Learner's module weights (name -> numpy array) for the default module."""
        from ray.rllib.core import DEFAULT_MODULE_ID

        return self.algo.learner_group.get_weights()[DEFAULT_MODULE_ID]

    def state(self) -> dict[str, Any]:
        """Picklable state, loadable in another process into a task built with the same options.

        Holds RLlib's full algorithm state (module weights, Adam moments, connector and
        metrics state, counters) and our step counter. Not bit-for-bit: RLlib does not
        save environment RNGs or episodes in progress.
        """
        return {
            "format": STATE_FORMAT,
            "step": self._step,
            "options": self._state_defining_options(),
            "algorithm": self.algo.get_state(),
            "metrics": dict(self._last_metrics),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load :meth:`state` output. The learning rate comes from the next ``train`` call's ``lr_at``."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported RLlib PPO state format {state.get('format')!r}, expected {STATE_FORMAT}")
        mine = self._state_defining_options()
        if dict(state["options"]) != mine:
            raise ValueError(f"state was saved with options {state['options']}, this task has {mine}")
        # A PBT exploit restores an older state (fewer updates) into a trial that trained longer: RLlib would
        # ignore weights not newer than the ones it holds. set_state also pushes them to the EnvRunners.
        self.algo.set_state(compat_rllib.restorable_state(self.algo, state["algorithm"]))
        self._step = int(state["step"])
        self._last_metrics = dict(state.get("metrics", _EMPTY_METRICS))

    def _state_defining_options(self) -> dict[str, Any]:
        """The options a saved state must share with this task to be loadable into it."""
        options = self.options.model_dump()
        return {key: options[key] for key in _STATE_DEFINING_OPTIONS}

    def close(self) -> None:
        """Stop the RLlib algorithm (its EnvRunners and Learners). Safe to call twice."""
        algo, self.algo = getattr(self, "algo", None), None
        if algo is None:
            return
        logdir = algo.logdir
        algo.stop()
        # Tune's Trainable base class makes an (unused) directory under ~/ray_results for
        # every algorithm; remove it when it is still empty so trials leave no litter.
        with contextlib.suppress(OSError):
            os.rmdir(logdir)

    def __enter__(self) -> RLlibPPOTask:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
