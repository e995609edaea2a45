"""Train one model with a schedule PBT discovered, as a fixed ``step -> lr`` function.

This is the test of a discovered schedule: if the lineage reconstruction is right, training the same task
from the same seed with that schedule reproduces the PBT trial's result (on CPU, with the shared trial seed,
step for step; on other hardware, within noise). The schedule is read from a sweep's ``schedules.json``,
either a local file or the artifact of an MLflow sweep run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from metaopt import user_code
from metaopt.config import quote
from metaopt.errors import ConfigError
from metaopt.optim import Schedule, piecewise_constant
from metaopt.pbt.lineage import trial_schedule
from metaopt.redact import redact_text
from metaopt.tasks import build_task, is_user_task

SCHEDULES_ARTIFACT = "schedules.json"


@dataclass
class ReplayResult:
    trial_id: str
    metric: str
    replay_metric: float
    pbt_metric: float
    steps: int
    seconds: float
    metrics: dict[str, float]

    @property
    def difference(self) -> float:
        return self.replay_metric - self.pbt_metric


def load_payload(ref: str, tracking_uri: str | None, *, python_objects: bool = False) -> dict[str, Any]:
    """A schedules.json path, or an MLflow sweep run id whose artifact it is; checked to be what a PBT sweep
    writes (:func:`metaopt.pbt.sweep.schedules_payload`), so replaying it cannot fail halfway with a traceback.
    ``python_objects``: a sweep of a task given as a Python object (``pickle:``) may be replayed (from Python,
    :func:`metaopt.api.replay`)."""
    from metaopt.config import exists, is_dir

    path = Path(ref)
    if is_dir(path):
        path = path / SCHEDULES_ARTIFACT
    if exists(path):
        return _checked_payload(path, str(path), python_objects)
    if not tracking_uri:
        raise ConfigError("RUN_OR_FILE", f"{quote(ref)} is not a file; to use an MLflow run id pass --tracking-uri")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        local = MlflowClient(tracking_uri).download_artifacts(ref, SCHEDULES_ARTIFACT)
    except MlflowException as err:
        raise ConfigError(
            "RUN_OR_FILE",
            redact_text(
                f"{quote(ref)} is neither a schedules.json file nor a sweep run at {quote(tracking_uri)} "
                f"({err.message.splitlines()[0]})"
            ),
        ) from None
    return _checked_payload(Path(local), f"run {ref} {SCHEDULES_ARTIFACT}", python_objects)


class _Trial(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schedule: list[tuple[StrictInt, StrictFloat | StrictInt]]  # empty for a trial that never reported
    final_metric: StrictFloat | StrictInt  # NaN (json writes NaN) for a diverged trial


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    experiment: dict[str, Any]
    steps_per_iteration: StrictInt = Field(ge=1)
    total_steps: StrictInt = Field(ge=1)
    best_trial: str | None = None
    parent_run_id: str | None = None
    code: dict[str, str] = Field(default_factory=dict)  # the user's task code: user_dir, module_file, sha256
    trials: dict[str, _Trial] = Field(min_length=1)


def _checked_payload(path: Path, field: str, python_objects: bool = False) -> dict[str, Any]:
    """The JSON at ``path`` (a regular file of at most 1 MiB) if it is a PBT sweep's schedules payload: its
    experiment a valid pbt experiment, every trial's schedule a valid piecewise-constant schedule."""
    from pydantic import ValidationError

    from metaopt import config

    text = config.read_text_capped(path, field, "schedules.json file")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(field, f"not a schedules JSON file ({err.msg} at line {err.lineno})") from None
    what = "not a PBT sweep's schedules.json"
    if not isinstance(payload, dict):
        raise ConfigError(field, f"{what}: expected a JSON object, got {type(payload).__name__} {quote(payload)}")
    try:
        checked = _Payload.model_validate(payload)
    except ValidationError as err:
        raise ConfigError(field, f"{what}: {config.first_error('', _Payload, err)}") from None
    section = checked.experiment.get("pbt")
    task = section.get("task") if isinstance(section, dict) else None
    if isinstance(task, str) and task.startswith(user_code.PICKLE_PREFIX) and not python_objects:
        raise ConfigError(
            field,
            "this sweep's task is an in-memory Python object; replay it from Python "
            f"(metaopt.api.replay({str(path)!r}))",
        )
    try:
        experiment = config.from_dict(checked.experiment, check_paths=False, python_objects=python_objects)
    except ConfigError as err:
        raise ConfigError(field, f"{what}: experiment.{err}") from None
    if experiment.kind != "pbt":
        raise ConfigError(field, f"{what}: its experiment is a {quote(experiment.kind)} experiment, not pbt")
    for trial_id, trial in checked.trials.items():
        if not trial.schedule:
            continue
        try:
            piecewise_constant(trial.schedule)
        except ConfigError as err:
            raise ConfigError(field, f"{what}: trials.{quote(trial_id)}.schedule: {err.problem}") from None
    if checked.best_trial is not None and checked.best_trial not in checked.trials:
        raise ConfigError(field, f"{what}: best_trial {quote(checked.best_trial)} is not one of its trials")
    return {**payload, "experiment": experiment.to_dict()}  # defaults filled in (tracking, seed ...)


def choose_trial(payload: dict[str, Any], trial_id: str | None) -> str:
    trials = payload["trials"]
    chosen = trial_id or payload.get("best_trial")
    if chosen is None:
        raise ConfigError("--trial", "the sweep has no best trial (all diverged?); pick one with --trial")
    if chosen not in trials:
        raise ConfigError("--trial", f"unknown trial {chosen!r}; this sweep has: {', '.join(sorted(trials))}")
    return chosen


def replay(payload: dict[str, Any], trial_id: str | None = None, progress: bool = True) -> ReplayResult:
    """Train the sweep's task from scratch with the chosen trial's lineage schedule."""
    chosen = choose_trial(payload, trial_id)
    section = payload["experiment"]["pbt"]
    schedule = [(int(s), float(lr)) for s, lr in payload["trials"][chosen]["schedule"]]
    lr_at = replay_schedule(schedule, section.get("lr_schedule", "constant"), int(payload["total_steps"]))
    with user_code.from_dir(code_dir(payload)):
        task = build_task(section["task"], section["task_options"], section["optimizer"], section["seed"])
        warning = changed_code_warning(payload)
    if warning and progress:
        print(warning, flush=True)
    per_iteration, total = int(payload["steps_per_iteration"]), int(payload["total_steps"])
    started = time.time()
    metrics: dict[str, float] = {}
    try:
        while task.step < total:
            metrics = task.train(min(per_iteration, total - task.step), lr_at)
            if progress:
                print(
                    f"[replay] step {task.step}/{total} lr {lr_at(task.step - 1):.3g} "
                    f"{task.metric} {metrics[task.metric]:.4f}",
                    flush=True,
                )
            if not math.isfinite(metrics.get("loss", 0.0)):
                break
    finally:
        close = getattr(task, "close", None)
        if close:
            close()
    return ReplayResult(
        trial_id=chosen,
        metric=task.metric,
        replay_metric=float(metrics.get(task.metric, math.nan)),
        pbt_metric=float(payload["trials"][chosen]["final_metric"]),
        steps=task.step,
        seconds=time.time() - started,
        metrics=metrics,
    )


def replay_schedule(schedule: list[tuple[int, float]], lr_schedule: str, total_steps: int) -> Schedule:
    """The ``step -> lr`` to replay: the lineage's segments, or for a ``lr_schedule: cosine`` baseline trial (one
    segment, its peak lr) the cosine decay over the budget it trained with
    (:func:`metaopt.pbt.lineage.trial_schedule`)."""
    if lr_schedule != "constant":
        return trial_schedule(schedule[0][1], lr_schedule, total_steps)
    return piecewise_constant(schedule)


def code_dir(payload: dict[str, Any]) -> Path:
    """Where the sweep's user task is imported from: the directory the sweep ran in, when it is on this machine;
    else the current one (the project copied elsewhere)."""
    recorded = payload.get("code", {}).get("user_dir")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return user_code.user_dir()


def changed_code_warning(payload: dict[str, Any]) -> str | None:
    """A warning line when the module of the sweep's task is not the code the sweep ran (its sha256 differs)."""
    code = payload.get("code") or {}
    task = payload["experiment"]["pbt"]["task"]
    if not code.get("sha256") or not is_user_task(task):
        return None
    file = user_code.module_file(task)
    if file is None or user_code.file_sha256(file) == code["sha256"]:
        return None
    return (
        f"[metaopt] warning: {file} is not the code the sweep ran (sha256 {code['sha256'][:12]}, now "
        f"{user_code.file_sha256(file)[:12]}); the replay may not reproduce the trial"
    )


def log_replay(result: ReplayResult, payload: dict[str, Any], tracking_uri: str) -> str:
    """Record the replay as a child of the sweep run it came from."""
    from metaopt import tracking

    tracking.check_server(tracking_uri)
    client, experiment_id = tracking.connect(
        tracking_uri, payload["experiment"]["tracking"]["experiment"] or payload["experiment"]["name"]
    )
    tags = {"metaopt.role": "replay", "replay_of_trial": result.trial_id}
    if payload.get("parent_run_id"):
        tags[tracking.PARENT_TAG] = payload["parent_run_id"]
    run = client.create_run(experiment_id, run_name=f"replay-{result.trial_id}", tags=tags)
    metrics = {**result.metrics, f"pbt_{result.metric}": result.pbt_metric, "difference": result.difference}
    client.log_batch(run.info.run_id, metrics=tracking.finite_metrics(metrics, result.steps, int(time.time() * 1000)))
    client.set_terminated(run.info.run_id)
    return run.info.run_id
