"""The start every capability's ``run`` shares: Ray (local or cluster), MLflow, the parent run, Tune storage.

``open_session`` connects to Ray once per process (``metaopt.runtime``), checks the per-trial resources
against what the cluster has, opens the MLflow experiment and the experiment's parent run, and says where
both are on the terminal.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

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
    resources = runtime.init(exp.ray, address)
    per_trial = runtime.trial_resources(exp.ray, resources)
    print(f"[metaopt] {resources.describe()}", flush=True)
    client, experiment_id = tracking.connect(exp.tracking.uri, exp.mlflow_experiment)
    run_name = f"{exp.name}-{run_label}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = tracking.ParentRun(client, experiment_id, run_name, exp.to_dict())
    print(f"[metaopt] MLflow: experiment {exp.mlflow_experiment!r}, run {parent.run_id} at {exp.tracking.uri}", flush=True)
    storage = str(Path(exp.ray.storage_path or "ray_results").expanduser().resolve())
    return Session(resources, per_trial, client, experiment_id, parent, storage, run_name)
