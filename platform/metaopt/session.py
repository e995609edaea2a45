"""The start every capability's ``run`` shares: Ray (local or cluster), MLflow, the parent run, Tune storage.

``open_session`` connects to Ray once per process (``metaopt.runtime``), checks the per-trial resources
against what the cluster has, opens the MLflow experiment and the experiment's parent run, and says where
both are on the terminal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from metaopt import runtime, tracking
from metaopt.config import Experiment


@dataclass
class Session:
    resources: runtime.Resources
    per_trial: dict[str, float]
    client: MlflowClient
    experiment_id: str
    parent: tracking.ParentRun
    storage_path: str
    run_name: str


def open_session(exp: Experiment, address: str | None, run_label: str, verbose: int) -> Session:
    """Ray + MLflow + parent run ``<name>-<run_label>-<time>``; ``verbose`` < 2 hides Tune's result-file noise."""
    if verbose < 2:
        # Tune warns "Remote file not found: result.json" each time a reused actor restores a trial whose
        # result file it has not written yet; harmless (progress.csv is what we read) and it buries the table.
        logging.getLogger("ray.tune.logger.logger").setLevel(logging.ERROR)
    tracking.check_server(exp.tracking.uri)  # an unreachable server is one error line before anything starts
    # MLflow opens its store (on a first run, seconds of creating its tables) while Ray starts: measured
    # 6.7 s + 3.5 s one after the other on 2 cores for the quickstart.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="metaopt-mlflow") as pool:
        connecting = pool.submit(tracking.connect, exp.tracking.uri, exp.mlflow_experiment)
        resources = runtime.init(exp.ray, address)
        per_trial = runtime.trial_resources(exp.ray, resources)
        print(f"[metaopt] {resources.describe()}", flush=True)
        client, experiment_id = connecting.result()
    run_name = f"{exp.name}-{run_label}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = tracking.ParentRun(client, experiment_id, run_name, exp.to_dict())
    print(f"[metaopt] MLflow: experiment {exp.mlflow_experiment!r}, run {parent.run_id} at {exp.tracking.uri}", flush=True)
    storage = str(Path(exp.ray.storage_path or "ray_results").expanduser().resolve())
    return Session(resources, per_trial, client, experiment_id, parent, storage, run_name)


def fit_tracked(exp: Experiment, session: Session, build_tuner: Callable[..., Any], *, metric: str, iterations: int,
                trial_row: Callable[[Any], dict[str, Any]], log_results: Callable[..., None],
                format_table: Callable[[list[dict[str, Any]]], str], callbacks: list[Any] | None, verbose: int,
                started: float) -> list[dict[str, Any]]:
    """The part of a grid-style capability's ``run`` after :func:`open_session`: a child MLflow run per trial, a
    compact progress line per result (``verbose`` 1), ``tuner.fit()``, one row per trial, the parent run's
    plots and files (``log_results``), the parent's final status, and the summary table."""
    trial_callback = tracking.MLflowTrialCallback(session.client, session.experiment_id, session.parent.run_id)
    progress = []
    if verbose == 1:
        from metaopt.progress import ProgressPrinter

        progress = [ProgressPrinter(metric, "max", iterations)]
    tuner = build_tuner(experiment_name=session.run_name, storage_path=session.storage_path,
                        resources=session.per_trial, max_concurrent_trials=exp.ray.max_concurrent_trials,
                        callbacks=[trial_callback, *progress, *(callbacks or [])], verbose=1 if verbose >= 2 else 0)
    try:
        rows = [trial_row(result) for result in tuner.fit()]
        log_results(session.parent, rows, exp)
    except BaseException:
        session.parent.finish("FAILED")
        raise
    session.parent.finish("FAILED" if any(r["error"] for r in rows) else "FINISHED")
    print(format_table(rows), flush=True)
    print(f"[metaopt] done in {time.time() - started:.1f}s. Look at the runs: {tracking.ui_command(exp.tracking.uri)}")
    return rows
