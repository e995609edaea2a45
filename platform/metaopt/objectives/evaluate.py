"""The ``lpo_eval`` experiment: learned objectives vs PPO and DPO on held-out envs and horizons.

Every (objective, env, horizon) is one Tune trial that trains PPO with that drift on ``seeds`` seeds (vmapped)
and reports the mean final return with a Student-t confidence interval. This module is the Tune/MLflow driver;
the statistics and the table live in :mod:`metaopt.objectives.eval_stats` (no Ray, no MLflow). The parent MLflow
run gets the table (CSV + JSON), one metric per cell, a bar chart and the drift heat-maps of every objective at the
configured training-progress values (Lu et al. 2022, Fig. 2; Jackson et al. ICLR 2024, Fig. 3).

Objectives: ``ppo`` and ``dpo`` (closed forms), a directory holding an exported drift (``drift.json``), or
``mlflow:RUN_ID`` (the ``drift/`` artifact of an ``lpo`` run, downloaded from the experiment's tracking URI).
"""

from __future__ import annotations

import csv
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metaopt import tracking
from metaopt.config import Experiment
from metaopt.errors import ConfigError
from metaopt.objectives.eval_stats import cell_metrics, csv_rows, evaluation_row, format_table, return_summary
from metaopt.session import SweepEnd, open_session

BUILTIN = ("ppo", "dpo")


@dataclass(frozen=True)
class Objective:
    """A drift to evaluate: its display name, drift kind, options and parameters (plain lists, Tune-friendly)."""

    label: str
    drift: str
    options: dict[str, Any]
    params: Any  # nested dict of lists, or {}

    def jax_params(self):
        import jax.numpy as jnp

        return _map_leaves(self.params, lambda x: jnp.asarray(x, dtype=jnp.float32))


def _map_leaves(tree: Any, fn) -> Any:
    if isinstance(tree, dict):
        return {k: _map_leaves(v, fn) for k, v in tree.items()}
    return fn(tree)


def resolve_objective(spec: str, tracking_uri: str) -> Objective:
    """``ppo`` / ``dpo`` / a drift directory / ``mlflow:RUN_ID`` -> Objective; ConfigError naming the entry."""
    if spec in BUILTIN:
        return Objective(spec, spec, {}, {})
    if spec.startswith("mlflow:"):
        run_id = spec.split(":", 1)[1]
        from mlflow.tracking import MlflowClient

        from metaopt.objectives.sweep import DRIFT_ARTIFACT

        client = MlflowClient(tracking_uri=tracking_uri)
        target = Path(tempfile.mkdtemp(prefix="metaopt-drift-"))
        try:
            local = client.download_artifacts(run_id, DRIFT_ARTIFACT, str(target))
        except Exception as err:  # mlflow raises several types for a missing run / artifact
            from metaopt.redact import redact_text

            raise ConfigError(
                "lpo_eval.objectives",
                redact_text(f"{spec}: no '{DRIFT_ARTIFACT}' artifact at {tracking_uri} ({str(err).splitlines()[0]})"),
            ) from None
        return _from_directory(Path(local), spec)
    path = Path(spec).expanduser()
    if not (path / "drift.json").exists():
        raise ConfigError(
            "lpo_eval.objectives",
            f"{spec!r} is not ppo, dpo, mlflow:RUN_ID or a directory holding drift.json (exported drift)",
        )
    return _from_directory(path, spec)


def _from_directory(path: Path, label: str) -> Objective:
    from metaopt.objectives.export import read_drift

    spec, arrays = read_drift(path)
    return Objective(label, spec.name, spec.as_dict(), {k: np.asarray(v).tolist() for k, v in arrays.items()})


def trial_options(objective: Objective, clip_eps: float) -> tuple[tuple[str, Any], ...]:
    """The drift options a trial trains with: the built-in ``ppo`` clips at the env's ``clip_eps`` (Schulman et
    al. 2017, eq. 7), as the meta-training baseline does; an exported drift keeps the options it recorded (a
    learned drift's inner PPO clip is its meta-training problems', :meth:`LPOSection.drift_options`)."""
    options = dict(objective.options)
    if objective.drift == "ppo" and "clip_eps" not in options:
        options["clip_eps"] = float(clip_eps)
    return tuple(sorted(options.items()))


def evaluation_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: PPO with one objective on one problem, ``seeds`` seeds; reports once."""
    import jax
    from ray import tune

    from metaopt.objectives.population import (
        PopulationEvaluator,
        Problem,
        seed_keys,
        stack_params,
    )

    objective = Objective(**config["objective"])
    problem = Problem.of(**config["problem"])
    params = objective.jax_params()
    batch = stack_params([params]) if jax.tree.leaves(params) else {}
    keys = seed_keys(jax.random.PRNGKey(config["seed"]), config["seeds"])
    started = time.perf_counter()
    options = trial_options(objective, problem.config().clip_eps)
    returns = PopulationEvaluator().returns(objective.drift, options, problem, batch, keys)[0]
    tune.report({**return_summary(returns, config["confidence"]), "seconds": time.perf_counter() - started})


def run(exp: Experiment, *, address: str | None = None, callbacks: list[Any] | None = None, verbose: int = 1):
    """Evaluate every objective on every env x horizon; print the table; log everything to MLflow."""
    from ray import tune

    from metaopt.objectives.meta_train import horizon_steps

    started = time.time()
    section = exp.section
    objectives = [resolve_objective(spec, exp.tracking.uri) for spec in section.objectives]
    problems = [
        {"env": spec.env, "total_timesteps": horizon_steps(spec.total_timesteps, h), "ppo": spec.ppo}
        for spec in section.envs
        for h in section.horizons
    ]
    session = open_session(exp, address, "eval", verbose)
    print(f"[metaopt] {len(objectives)} objectives x {len(problems)} env/horizons x {section.seeds} seeds", flush=True)
    trial_callback = tracking.MLflowTrialCallback(session.opening)
    with SweepEnd(exp, session, trial_callback, 1, started) as end:
        tuner = tune.Tuner(
            tune.with_resources(evaluation_trial, session.per_trial),
            param_space={
                "objective": tune.grid_search([o.__dict__ for o in objectives]),
                "problem": tune.grid_search(problems),
                "seeds": section.seeds,
                "seed": section.seed,
                "confidence": section.confidence,
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=exp.ray.max_concurrent_trials),
            run_config=tune.RunConfig(
                name=session.run_name,
                storage_path=session.storage_path,
                callbacks=[trial_callback, *(callbacks or [])],
                verbose=1 if verbose >= 2 else 0,
            ),
        )
        results = tuner.fit()
        end.conclude(results)
        table = [table_row(r) for r in results]
        log_evaluation(session.parent, exp, objectives, table, problems)
        print(format_table(table, section.confidence), flush=True)
    return table


def table_row(result) -> dict[str, Any]:
    """A Tune result's row of the table (:func:`metaopt.objectives.eval_stats.evaluation_row`)."""
    return evaluation_row(result.config, result.metrics, result.error)


def log_evaluation(
    parent, exp: Experiment, objectives: list[Objective], table: list[dict], problems: list[dict]
) -> None:
    from metaopt.objectives import plots
    from metaopt.objectives.drifts import make_drift
    from metaopt.objectives.population import Problem
    from metaopt.objectives.sweep import reference_log_horizon

    parent.log_metrics(cell_metrics(table))
    parent.log_json("evaluation.json", table)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "evaluation.csv"
        with path.open("w", newline="") as handle:
            csv.writer(handle).writerows(csv_rows(table))
        parent.log_file(path)
    parent.log_figure(
        plots.plot_eval_bars(table, f"{exp.name}: final return, {exp.section.confidence:.0%} interval"),
        "evaluation.png",
    )
    first = problems[0]
    clip_eps = Problem.of(**first).config().clip_eps  # the built-in ppo's heat-map: the first env's clip
    drifts = {}
    for o in objectives:
        drift_fn, _ = make_drift(o.drift, **dict(trial_options(o, clip_eps)))
        drifts[o.label] = (drift_fn, o.jax_params())
    log_horizon = reference_log_horizon(first["env"], first["total_timesteps"], first["ppo"])
    parent.log_figure(
        plots.plot_drift_heatmaps(drifts, list(exp.section.heatmap_progress), log_horizon, f"{exp.name}: drift"),
        "drift_heatmaps.png",
    )
