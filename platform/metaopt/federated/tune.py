"""The only place in ``metaopt.federated`` that knows Ray Tune: one trial = one federated training, one
iteration = one round. The trial starts its clients as Ray actors in its own placement group (one bundle per
client) and checkpoints the server side every round, so a crashed trial resumes with no lost round."""

from __future__ import annotations

import gc
import json
import math
from typing import Any

from ray import tune

from metaopt.federated.config import FederatedSection
from metaopt.runtime import with_worker_bundles
from metaopt.trainable import Trainable
from metaopt.tuning import SweepSettings, grid_tuner, lr_pbt


def input_shape(dataset) -> int:
    """Features per sample (the MLP's input width); :attr:`Dataset.sample_shape` is the sample's shape."""
    return int(math.prod(dataset.x.shape[1:]))


class FederatedTrainable(Trainable):
    """``config``: ``exp`` (the resolved section), ``strategy``, ``lr`` (initial local lr), ``seed``.

    Tune reuses this actor from trial to trial (``reuse_actors``): a PBT pause or the next cell of the grid
    resets it through :meth:`reset_config`, which keeps the client actors when the next trial's clients would
    hold the same shards -- same section and seed -- instead of starting N new processes that each import
    torch again.
    """

    uses_torch = True
    pool = None  # the client actors (a ClientPool), started by the first trial on this actor
    clients_key: str | None = None  # what decides them (:func:`clients_key`)

    def start(self, config: dict[str, Any]) -> None:
        """This trial's server side, on the client actors already running when their shards are this trial's."""
        from metaopt.federated.rounds import FederatedRun, RoundSettings
        from metaopt.federated.strategies import make_strategy

        section = FederatedSection.model_validate(config["exp"])
        key = clients_key(config)
        if key != self.clients_key:
            self._start_clients(section, int(config["seed"]))
            self.clients_key = key
        shards, sample_shape, num_classes = self.client_data
        options = section.strategy_options(config["strategy"])
        settings = RoundSettings(
            fraction=section.fraction,
            epochs=section.local_epochs,
            lr0=float(config["lr"]),
            optimizer=section.client_optimizer,
            momentum=section.client_momentum,
            batch_size=section.batch_size,
            seed=int(config["seed"]),
            timeout_s=section.round_timeout_s,
        )
        self.run = FederatedRun(
            shards,
            self.pool,
            make_strategy(config["strategy"], **options),
            settings,
            sample_shape,
            num_classes,
            tuple(section.hidden),
            section.model,
        )

    def _start_clients(self, section: FederatedSection, seed: int) -> None:
        from metaopt.federated.clients import ClientPool
        from metaopt.federated.data import make_client_shards, section_dataset

        if self.pool is not None:
            self.pool.close()
        data = section_dataset(section, seed=seed)  # built-in or the researcher's own (its module found by name)
        shards = make_client_shards(
            data, section.num_clients, section.partition, section.alpha, section.val_fraction, seed=seed
        )
        self.client_data = (shards, data.sample_shape, data.num_classes)
        self.pool = ClientPool(
            *self.client_data,
            tuple(section.hidden),
            cpus=section.cpus_per_client,
            gpus=section.gpus_per_client,
            model=section.model,
        )

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        # Another trial on this actor: a fresh server side (Tune loads its checkpoint next, if it has one).
        self.start(new_config)
        return True

    def step(self) -> dict[str, Any]:
        metrics = self.run.run_round()
        metrics.pop("failed_ids")
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> int:
        self.run.load_state_dict(state)
        # After a PBT exploit the clone's state arrives with this trial's perturbed lr in config: the new lr0.
        lr = float(self.config["lr"])
        if self.run.state.lr0 is not None and not math.isclose(lr, self.run.state.lr0):
            self.run.set_initial_lr(lr)
        return self.run.round

    def cleanup(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = self.run = None
            gc.collect()  # the handles go now, not under the SIGTERM that ends this process


def clients_key(config: dict[str, Any]) -> str:
    """What decides a trial's client actors: the section (dataset, split, model, client resources) and the seed.
    Strategy and lr are the server's and the rounds'; they do not touch the clients."""
    return json.dumps({"exp": config["exp"], "seed": config["seed"]}, sort_keys=True)


def build_tuner(section: FederatedSection, sweep: SweepSettings) -> tune.Tuner:
    """Strategies x initial lrs x seeds as a grid; a checkpoint after every round, the last
    ``sweep.checkpoints_to_keep`` kept."""
    trial_resources = with_worker_bundles(
        sweep.resources, section.num_clients, section.cpus_per_client, section.gpus_per_client
    )
    scheduler = None
    if section.scheduler == "pbt":
        scheduler = lr_pbt(
            "accuracy", section.pbt_interval, min(section.lrs) / 10, max(section.lrs) * 10, seed=section.seeds[0]
        )
    # Every strategy x lr x seed, seed-major: consecutive trials then share their clients' shards, and a reused
    # trial actor keeps its client actors (FederatedTrainable.reset_config). A grid_search would order the cells
    # by key name, with the seed changing from one trial to the next.
    cells = [
        {"seed": seed, "strategy": strategy, "lr": lr}
        for seed in section.seeds
        for strategy in section.strategies
        for lr in section.lrs
    ]
    param_space = {
        "exp": section.model_dump(mode="json"),
        "seed": tune.choice(list(section.seeds)),
        "strategy": tune.choice(list(section.strategies)),
        "lr": tune.choice(list(section.lrs)),
    }
    return grid_tuner(
        FederatedTrainable,
        trial_resources,
        param_space,
        iterations=section.rounds,
        scheduler=scheduler,
        max_failures=section.max_failures,
        sweep=sweep,
        reuse_actors=True,
        cells=cells,
    )
