"""Meta-training a learned PPO objective with evolution strategies, top to bottom.

One generation (Lu et al. 2022, "Discovered Policy Optimisation"; Jackson et al. ICLR 2024, TA-LPO):

1. ask OpenAI-ES (Salimans et al. 2017; evosax ``Open_ES``, antithetic sampling) for ``population`` drift
   parameter vectors around the mean;
2. for every meta-training env, draw this generation's training horizon (TA-LPO needs several, so its
   temporal inputs carry information) and train PPO with each member's drift on the same seeds;
3. fitness of a member = mean over envs of its final mean return normalised by PPO's on that env and
   horizon (:func:`normalised`: return / PPO's return, 1.0 = PPO); evosax minimises, so it is told the
   negated fitness (centered-rank shaped, Adam on the mean, decaying sigma and learning rate);
4. every ``eval_every`` generations (and at the last) the ES *mean* is trained on every env and horizon with
   fresh seeds: ``mean_score`` is the quantity to watch.

Each generation's randomness is ``fold_in(root_key, generation)``, so a run restored from a checkpoint of
generation g continues bit-identically. :func:`metaopt.objectives.sweep.run_meta_training` (the ``lpo`` kind)
runs this in a Tune experiment (:mod:`metaopt.objectives.tune`), logs every trial to MLflow and exports the
discovered drift.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metaopt.objectives.config import ESConfig, LPOSection
from metaopt.objectives.population import PopulationEvaluator, Problem, seed_keys
from metaopt.objectives.ppo_settings import env_label

#: Seed of the PPO reference runs; fixed so every meta-seed normalises by the same baseline.
BASELINE_SEED = 10_000


def build_strategy(es: ESConfig, solution: Any):
    """evosax OpenAI-ES with the config's antithetic sampling, fitness shaping and decaying sigma / Adam lr."""
    import optax
    from evosax.algorithms import Open_ES
    from evosax.core.fitness_shaping import (
        centered_rank_fitness_shaping_fn,
        identity_fitness_shaping_fn,
        standardize_fitness_shaping_fn,
    )

    shaping = {
        "centered_rank": centered_rank_fitness_shaping_fn,
        "standardize": standardize_fitness_shaping_fn,
        "raw": identity_fitness_shaping_fn,
    }[es.fitness_shaping]
    lr = optax.exponential_decay(es.lr, transition_steps=1, decay_rate=es.lr_decay, end_value=es.lr_min)
    sigma = optax.exponential_decay(
        es.sigma_init, transition_steps=1, decay_rate=es.sigma_decay, end_value=es.sigma_min
    )
    return Open_ES(
        population_size=es.population,
        solution=solution,
        use_antithetic_sampling=es.antithetic,
        optimizer=optax.adam(learning_rate=lr),
        std_schedule=sigma,
        fitness_shaping_fn=shaping,
    )


def initial_mean(zero_params: dict[str, Any], key) -> dict[str, Any]:
    """The ES starting point: exactly PPO's objective, but not at the symmetric point 0.

    The drift network ``out . tanh(hidden . x)`` has no biases, so negating *all* weights gives the same output.
    At a mean of 0, antithetic pairs mean ± sigma·z are then the same drift, score the same, and cancel in
    the ES gradient: the mean never moves. With random hidden weights and a zero output layer the network
    still outputs exactly 0 (the drift is PPO's), and a pair (W + sigma·z, sigma·u) vs (W - sigma·z, -sigma·u)
    differs.
    """
    import jax
    import jax.numpy as jnp

    hidden = zero_params["hidden"]
    fan_in = hidden.shape[0]
    return {
        **zero_params,
        "hidden": jax.random.normal(key, hidden.shape, jnp.float32) / jnp.sqrt(jnp.float32(fan_in)),
        "out": jnp.zeros_like(zero_params["out"]),
    }


def horizon_steps(total_timesteps: int, multiplier: float) -> int:
    return max(1, round(total_timesteps * multiplier))


def normalised(returns: np.ndarray, baseline: float) -> np.ndarray:
    """``1 + (R - R_ppo) / |R_ppo|``: R / R_ppo when PPO's return is positive (the LPO papers' fitness); for
    negative returns (Acrobot) still 1.0 = as good as PPO and > 1 = better, so envs of either sign average."""
    return 1.0 + (returns - baseline) / abs(baseline)


def baseline_options(problem: Problem) -> tuple[tuple[str, Any], ...]:
    """The ``ppo`` drift options of the baseline run: the env's own PPO clip (its ``clip_eps`` from
    TUNED_ENVS / the entry's ``ppo``), not a fixed 0.2 (Schulman et al. 2017, eq. 7)."""
    return (("clip_eps", float(problem.config().clip_eps)),)


@dataclass
class GenerationResult:
    fitness: np.ndarray  # [population] normalised score (higher is better)
    per_env: dict[str, float]  # mean normalised score over members, per env
    horizons: dict[str, int]
    seconds: float
    env_steps: int
    extra: dict[str, float] = field(default_factory=dict)


class MetaTrainer:
    """The ES state machine of one meta-training run; the evaluator (local or Ray) trains the PPO runs."""

    def __init__(self, section: LPOSection, meta_seed: int, evaluator: Any | None = None):
        import jax

        from metaopt.objectives.drifts import make_drift

        self.section = section
        self.drift_options = section.drift_options()
        _, self.initial_params = make_drift(section.drift, **dict(self.drift_options))
        self.strategy = build_strategy(section.es, self.initial_params)
        self.es_params = self.strategy.default_params
        self.root = jax.random.PRNGKey(meta_seed)
        self.evaluator = evaluator or PopulationEvaluator()
        self.baselines: dict[str, float] = {}

    # ---- state -------------------------------------------------------------------------------------------
    def init_state(self):
        import jax

        key = jax.random.fold_in(self.root, 2**31 - 1)
        mean_key, init_key = jax.random.split(key)
        return self.strategy.init(init_key, initial_mean(self.initial_params, mean_key), self.es_params)

    def mean_params(self, state) -> Any:
        return self.strategy.get_mean(state)

    def problems(self, spec_index: int) -> list[Problem]:
        spec = self.section.envs[spec_index]
        return [Problem.of(spec.env, horizon_steps(spec.total_timesteps, h), spec.ppo) for h in self.section.horizons]

    def baseline(self, problem: Problem) -> float:
        """PPO's mean final return on this env and horizon (cached; saved in checkpoints)."""
        import jax

        if problem.label not in self.baselines:
            keys = seed_keys(jax.random.PRNGKey(BASELINE_SEED), self.section.baseline_seeds)
            returns = self.evaluator.returns("ppo", baseline_options(problem), problem, {}, keys)
            baseline = float(np.mean(returns))
            if not np.isfinite(baseline) or abs(baseline) < 1e-6:
                raise ValueError(
                    f"PPO's mean final return on {problem.env} with {problem.total_timesteps} steps is {baseline}: "
                    "no episode finished or no reward to normalise by; raise total_timesteps"
                )
            self.baselines[problem.label] = baseline
        return self.baselines[problem.label]

    def draw_problem(self, env_key, env_index: int) -> tuple[Problem, Any]:
        """This generation's horizon for one env (uniform over ``horizons``) and the key of its PPO seeds."""
        import jax

        horizon_key, seeds_key = jax.random.split(jax.random.fold_in(env_key, env_index))
        options = self.problems(env_index)
        return options[int(jax.random.randint(horizon_key, (), 0, len(options)))], seeds_key

    # ---- one generation ----------------------------------------------------------------------------------
    def generation(self, state, generation: int):
        """Ask, train every member on every env (this generation's horizon), tell. Returns (state, result)."""
        import jax
        import jax.numpy as jnp

        started = time.perf_counter()
        key = jax.random.fold_in(self.root, generation)
        ask_key, tell_key, env_key = jax.random.split(key, 3)
        population, state = self.strategy.ask(ask_key, state, self.es_params)
        scores, per_env, horizons, env_steps = [], {}, {}, 0
        for i in range(len(self.section.envs)):
            problem, seeds_key = self.draw_problem(env_key, i)
            baseline = self.baseline(problem)
            keys = seed_keys(seeds_key, self.section.seeds_per_member)
            returns = self.evaluator.returns(self.section.drift, self.drift_options, problem, population, keys)
            score = normalised(returns.mean(axis=1), baseline)
            scores.append(score)
            per_env[env_label(problem.env)] = float(score.mean())
            horizons[env_label(problem.env)] = problem.total_timesteps
            env_steps += problem.total_timesteps * returns.size
        fitness = np.mean(scores, axis=0)
        # evosax minimises; NaN (a diverged PPO run) ranks last.
        to_minimise = jnp.asarray(np.where(np.isfinite(fitness), -fitness, np.inf), dtype=jnp.float32)
        state, _ = self.strategy.tell(tell_key, population, to_minimise, state, self.es_params)
        return state, GenerationResult(fitness, per_env, horizons, time.perf_counter() - started, env_steps)

    def evaluate_mean(self, state, generation: int) -> dict[str, float]:
        """Train PPO with the ES mean on every env and horizon; mean normalised score per problem."""
        import jax

        from metaopt.objectives.population import stack_params

        params = stack_params([self.mean_params(state)])
        # The same evaluation seeds at every generation (never the ES's): the curve shows the drift, not seed luck.
        del generation
        key = jax.random.fold_in(self.root, 2**31 - 2)
        out: dict[str, float] = {}
        for i in range(len(self.section.envs)):
            for problem in self.problems(i):
                keys = seed_keys(jax.random.fold_in(key, zlib.crc32(problem.label.encode())), self.section.eval_seeds)
                returns = self.evaluator.returns(self.section.drift, self.drift_options, problem, params, keys)
                out[f"eval/{problem.label}/return"] = float(returns.mean())
                out[f"eval/{problem.label}/score"] = float(normalised(returns.mean(), self.baseline(problem)))
        scores = [v for k, v in out.items() if k.endswith("/score")]
        out["mean_score"] = float(np.mean(scores))
        return out

    def eval_template(self) -> dict[str, float]:
        """The keys :meth:`evaluate_mean` reports, all NaN."""
        keys = ["mean_score"]
        for i in range(len(self.section.envs)):
            for problem in self.problems(i):
                keys += [f"eval/{problem.label}/return", f"eval/{problem.label}/score"]
        return dict.fromkeys(keys, math.nan)

    def generation_metrics(self, state, result: GenerationResult) -> dict[str, float]:
        fitness = result.fitness[np.isfinite(result.fitness)]
        metrics = {
            "fitness_mean": float(fitness.mean()) if fitness.size else math.nan,
            "fitness_max": float(fitness.max()) if fitness.size else math.nan,
            "fitness_min": float(fitness.min()) if fitness.size else math.nan,
            "diverged_members": int((~np.isfinite(result.fitness)).sum()),
            "sigma": float(state.std),
            "mean_norm": float(np.linalg.norm(np.asarray(state.mean))),
            "generation_seconds": result.seconds,
            "env_steps_per_second": result.env_steps / max(result.seconds, 1e-9),
        }
        for env, score in result.per_env.items():
            metrics[f"score/{env}"] = score
            metrics[f"horizon/{env}"] = result.horizons[env]
        return metrics
