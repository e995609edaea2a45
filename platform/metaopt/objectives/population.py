"""Train PPO once per (population member x seed), vmapped and jitted; optionally split over Ray actors.

A :class:`PopulationEvaluator` owns one compiled ``vmap(members) o vmap(seeds) o train`` per (drift, env, horizon,
shape), so ES generations after the first pay no compile. When the process sees several JAX devices (GPUs)
the member axis is sharded over them. :class:`RayPopulation` splits the member axis over Ray actors, each an
evaluator of its own (one per GPU or CPU slot on a cluster); results are concatenated in member order.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Problem:
    """One PPO training problem: env, horizon (env steps) and PPO overrides (as canonical JSON: hashable)."""

    env: str
    total_timesteps: int
    ppo_json: str = "{}"

    @classmethod
    def of(cls, env: str, total_timesteps: int, ppo: dict[str, Any] | None = None) -> Problem:
        return cls(env, int(total_timesteps), json.dumps(ppo or {}, sort_keys=True))

    @property
    def label(self) -> str:
        """``{env}_{total_timesteps}``: a gymnax id as is, a user env by its factory's name (metric keys)."""
        from metaopt.objectives.ppo_settings import env_label

        return f"{env_label(self.env)}_{self.total_timesteps}"

    def config(self):
        from metaopt.objectives.ppo_settings import ppo_config_for

        return ppo_config_for(self.env, total_timesteps=self.total_timesteps, **json.loads(self.ppo_json))


def seed_keys(key, count: int):
    """``count`` PPO seeds from one key (shared by every member: common random numbers lower ES variance)."""
    import jax

    return jax.random.split(key, count)


def enable_compilation_cache() -> str | None:
    """Persist XLA executables across processes (``$METAOPT_JAX_CACHE``, default ``~/.cache/metaopt/jax``;
    ``off`` disables): a PPO program compiles in tens of seconds on a CPU, and restored trials, Ray workers and
    evaluation runs would otherwise compile it again."""
    import os

    import jax

    path = os.environ.get("METAOPT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "metaopt", "jax"))
    if path.lower() == "off":
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


class PopulationEvaluator:
    """Final mean returns of PPO runs, shape [members, seeds], for batches of drift parameters."""

    def __init__(self, shard: bool = True) -> None:
        enable_compilation_cache()
        self.shard = shard  # spread members over this process's devices (GPUs) when there are several
        self._compiled: dict[tuple, Any] = {}
        self._drifts: dict[tuple, Any] = {}
        self.compile_seconds = 0.0  # lowering + XLA compilation (or loading from the persistent cache)

    def _drift_fn(self, drift: str, options: tuple):
        from metaopt.objectives.drifts import make_drift

        key = (drift, options)
        if key not in self._drifts:
            self._drifts[key] = make_drift(drift, **dict(options))[0]
        return self._drifts[key]

    def _program_key(self, drift: str, options: tuple, problem: Problem) -> tuple:
        """What a compiled program is cached by: the drift, its options, the problem and, for a user env, its
        module's file as it is now (:func:`~metaopt.objectives.envs.code_fingerprint`: an edit recompiles)."""
        from metaopt.objectives.envs import code_fingerprint

        return (drift, options, problem, code_fingerprint(problem.env))

    def _train_batch(self, key: tuple, drift: str, options: tuple, problem: Problem):
        import jax

        from metaopt.objectives.ppo import make_train

        if key not in self._compiled:
            train = make_train(problem.config(), self._drift_fn(drift, options))
            over_seeds = jax.vmap(train, in_axes=(0, None))
            over_members = jax.vmap(over_seeds, in_axes=(None, 0))

            def batch(params, keys):
                if not jax.tree.leaves(params):  # a fixed drift (ppo, dpo): one "member", no axis to map
                    return over_seeds(keys, params)["final_return"][None]
                return over_members(keys, params)["final_return"]

            self._compiled[key] = jax.jit(batch)
        return self._compiled[key]

    def _executable(self, drift: str, options: tuple, problem: Problem, params_batch: Any, keys):
        """The compiled program for these shapes (ahead of time, so compile time is measured on its own)."""
        import jax

        shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves((params_batch, keys)))
        program = self._program_key(drift, options, problem)
        key = (*program, shapes)
        if key not in self._compiled:
            started = time.perf_counter()
            traced = self._train_batch(program, drift, options, problem)
            self._compiled[key] = traced.lower(params_batch, keys).compile()
            self.compile_seconds += time.perf_counter() - started
        return self._compiled[key]

    def returns(self, drift: str, options: tuple, problem: Problem, params_batch: Any, keys) -> np.ndarray:
        """``params_batch``: drift params with a leading member axis; ``keys``: [seeds] PRNG keys."""
        import jax
        import jax.numpy as jnp

        params_batch = jax.tree.map(jnp.asarray, params_batch)
        if self.shard:
            params_batch = shard_members(params_batch)
        keys = jnp.asarray(keys)
        executable = self._executable(drift, options, problem, params_batch, keys)
        return np.asarray(jax.block_until_ready(executable(params_batch, keys)))


def shard_members(params_batch: Any) -> Any:
    """Spread the member axis over this process's JAX devices when there are several and it divides evenly."""
    import jax

    devices = jax.local_devices()
    leaves = jax.tree.leaves(params_batch)
    if len(devices) < 2 or not leaves or leaves[0].shape[0] % len(devices):
        return params_batch
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices), ("members",))
    return jax.device_put(params_batch, NamedSharding(mesh, PartitionSpec("members")))


def split_members(params_batch: Any, parts: int) -> list[Any]:
    """Cut a batched pytree into at most ``parts`` contiguous member chunks, sizes differing by at most one
    (numpy, ready for the object store); never an empty chunk (one member -> one chunk)."""
    import jax

    numpy_batch = jax.tree.map(np.asarray, params_batch)
    size = jax.tree.leaves(numpy_batch)[0].shape[0]
    bounds = np.linspace(0, size, min(parts, size) + 1).astype(int)
    return [jax.tree.map(lambda x, a=a, b=b: x[a:b], numpy_batch) for a, b in itertools.pairwise(bounds)]


class RayPopulation:
    """The member axis split over ``workers`` Ray actors, each a :class:`PopulationEvaluator`.

    Actors are placed in the calling Tune trial's placement group (its extra bundles), so a cluster gives each
    its own CPU/GPU slot. Results come back in member order.
    """

    def __init__(self, workers: int, cpus: float = 1.0, gpus: float = 0.0):
        import ray

        actor = ray.remote(PopulationEvaluator)
        self.actors = [actor.options(num_cpus=cpus, num_gpus=gpus).remote() for _ in range(workers)]

    def returns(self, drift: str, options: tuple, problem: Problem, params_batch: Any, keys) -> np.ndarray:
        import ray

        keys = np.asarray(keys)
        if not jax_leaves(params_batch):  # a fixed drift (the PPO baseline): one run set, on one actor
            return ray.get(self.actors[0].returns.remote(drift, options, problem, params_batch, keys))
        chunks = split_members(params_batch, len(self.actors))
        futures = [a.returns.remote(drift, options, problem, c, keys) for a, c in zip(self.actors, chunks)]
        # zip stops at the shorter: a batch smaller than the worker count uses only as many workers as members
        return np.concatenate(ray.get(futures), axis=0)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def jax_leaves(tree: Any) -> list:
    import jax

    return jax.tree.leaves(tree)


def stack_params(params: Sequence[Any]) -> Any:
    """One pytree with a leading member axis from a list of parameter pytrees."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *xs: jnp.stack(xs), *params)
