"""The Tune set-up shared by the capabilities whose trials are a grid (federated, posttrain): one Tuner with a
checkpoint every iteration, a failure budget, and optionally synchronous PBT over the trial config's ``lr``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STATE_FILE = "trial_state.pt"


def save_state(state: dict[str, Any], checkpoint_dir: str) -> str:
    """A trainable's state (``torch.save``) into its Tune checkpoint directory."""
    import torch

    torch.save(state, Path(checkpoint_dir) / STATE_FILE)
    return checkpoint_dir


def load_state(checkpoint: str | dict) -> dict[str, Any]:
    """What :func:`save_state` wrote; Tune passes the directory, or a dict holding it."""
    import torch

    directory = Path(checkpoint if isinstance(checkpoint, str) else checkpoint["checkpoint_dir"])
    return torch.load(directory / STATE_FILE, weights_only=False)


def lr_pbt(metric: str, interval: int, low: float, high: float) -> Any:
    """Synchronous PBT on ``metric`` (max) every ``interval`` iterations; explore draws ``lr`` log-uniformly
    from [low, high] or perturbs it (Jaderberg et al. 2017)."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    return PopulationBasedTraining(time_attr="training_iteration", metric=metric, mode="max",
                                   perturbation_interval=interval,
                                   hyperparam_mutations={"lr": tune.loguniform(low, high)}, synch=True)


def grid_tuner(trainable: Any, trial_resources: Any, param_space: dict[str, Any], *, iterations: int,
               scheduler: Any, max_failures: int, experiment_name: str, storage_path: str,
               max_concurrent_trials: int | None, callbacks: list[Any], verbose: int = 0) -> Any:
    """A Tuner over ``param_space`` with ``iterations`` per trial and a checkpoint after every iteration (all of
    them kept under PBT, which restores any peer's; the last two otherwise)."""
    from ray import tune

    return tune.Tuner(
        tune.with_resources(trainable, trial_resources),
        param_space=param_space,
        # PBT must see the whole population (a concurrency limit would hide the trials not started yet); the
        # resources still decide how many train at once, and PBT pauses trials at its synchronous boundaries.
        tune_config=tune.TuneConfig(max_concurrent_trials=None if scheduler else max_concurrent_trials,
                                    reuse_actors=False, scheduler=scheduler),
        run_config=tune.RunConfig(
            name=experiment_name, storage_path=storage_path, stop={"training_iteration": iterations},
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1, checkpoint_at_end=True,
                                                    num_to_keep=None if scheduler else 2),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=callbacks, verbose=verbose,
        ),
    )
