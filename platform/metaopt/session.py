"""The start every capability's ``run`` shares: Ray (local or cluster), MLflow, the parent run, Tune storage.

``open_session`` connects to Ray once per process (``metaopt.runtime``), checks the per-trial resources
against what the cluster has, opens the MLflow experiment and the experiment's parent run, and says where
both are on the terminal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from mlflow.tracking import MlflowClient

from metaopt import runtime, tracking
from metaopt.config import Experiment
from metaopt.errors import ConfigError


@dataclass
class Session:
    resources: runtime.Resources
    per_trial: dict[str, float]
    opening: Future[tracking.ParentRun]  # the parent run, still being opened while the Tuner starts
    storage_path: str
    run_name: str

    @property
    def parent(self) -> tracking.ParentRun:
        """The sweep's parent run (waits until MLflow has opened it; raises what opening it raised)."""
        return self.opening.result()


def open_session(exp: Experiment, address: str | None, run_label: str, verbose: int) -> Session:
    """Ray + MLflow + parent run ``<name>-<run_label>-<time>``; ``verbose`` < 2 hides Tune's result-file noise.

    Returns once Ray is up. MLflow opens its store and the parent run in a background thread: on a first run,
    seconds of creating its tables (measured 6.7 s next to Ray's 3.5 s on 2 cores for the quickstart), during
    which Ray starts and then Tune starts the trial processes. Pass :attr:`Session.opening` to
    :class:`tracking.MLflowTrialCallback`; :attr:`Session.parent` waits for it.
    """
    if verbose < 2:
        # Tune warns "Remote file not found: result.json" each time a reused actor restores a trial whose
        # result file it has not written yet; harmless (progress.csv is what we read) and it buries the table.
        logging.getLogger("ray.tune.logger.logger").setLevel(logging.ERROR)
    # an unreachable server or an unwritable store is one error line before anything starts
    tracking.check_server(exp.tracking.uri)
    tracking.check_sqlite_store(exp.tracking.uri)
    run_name = f"{exp.name}-{run_label}-{time.strftime('%Y%m%d-%H%M%S')}"
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metaopt-mlflow")
    try:
        connecting = pool.submit(tracking.connect, exp.tracking.uri, exp.mlflow_experiment)
        resources = runtime.init(exp.ray, address)
        per_trial = runtime.trial_resources(exp.ray, resources)
        print(f"[metaopt] {resources.describe()}", flush=True)
        # Only once Ray is up and the resources fit: a failed start leaves no parent run behind.
        opening = pool.submit(open_parent, connecting, exp, run_name)
    finally:
        pool.shutdown(wait=False)
    storage = str(Path(exp.ray.storage_path or "ray_results").expanduser().resolve())
    return Session(resources, per_trial, opening, storage, run_name)


def open_parent(connecting: Future[tuple[MlflowClient, str]], exp: Experiment, run_name: str) -> tracking.ParentRun:
    """The sweep's parent run, once MLflow is connected. A store MLflow cannot open or read (a file error, not a
    database) is a :class:`ConfigError` on ``tracking.uri``, raised wherever the parent is first needed
    (capabilities ask for it when a fit fails); other MLflow errors pass through as they are."""
    try:
        client, experiment_id = connecting.result()
        parent = tracking.ParentRun(client, experiment_id, run_name, exp.to_dict())
    except (OSError, sqlalchemy.exc.DatabaseError) as err:
        if "database is locked" in str(err):  # another process holds the sqlite file: not the configuration
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("tracking.uri", f"MLflow cannot use {exp.tracking.uri}: {reason}") from err
    print(f"[metaopt] MLflow: experiment {exp.mlflow_experiment!r}, run {parent.run_id} at {exp.tracking.uri}", flush=True)
    return parent


def fit_tracked(exp: Experiment, session: Session, build_tuner: Callable[..., Any], *, metric: str, iterations: int,
                trial_row: Callable[[Any], dict[str, Any]], log_results: Callable[..., None],
                format_table: Callable[[list[dict[str, Any]]], str], callbacks: list[Any] | None, verbose: int,
                started: float) -> list[dict[str, Any]]:
    """The part of a grid-style capability's ``run`` after :func:`open_session`: a child MLflow run per trial, a
    compact progress line per result (``verbose`` 1), ``tuner.fit()``, one row per trial, the parent run's
    plots and files (``log_results``), the parent's final status, and the summary table."""
    trial_callback = tracking.MLflowTrialCallback(session.opening)
    progress = []
    if verbose == 1:
        from metaopt.progress import ProgressPrinter

        progress = [ProgressPrinter(metric, "max", iterations)]
    try:
        tuner = build_tuner(experiment_name=session.run_name, storage_path=session.storage_path,
                            resources=session.per_trial, max_concurrent_trials=exp.ray.max_concurrent_trials,
                            callbacks=[trial_callback, *progress, *(callbacks or [])], verbose=1 if verbose >= 2 else 0)
        rows = [trial_row(result) for result in tuner.fit()]
        log_results(session.parent, rows, exp)
    except BaseException:
        session.parent.finish("FAILED")
        raise
    session.parent.finish("FAILED" if any(r["error"] for r in rows) else "FINISHED")
    print(format_table(rows), flush=True)
    print(f"[metaopt] done in {time.time() - started:.1f}s. Look at the runs: {tracking.ui_command(exp.tracking.uri)}")
    return rows
