"""pbt's extra CLI verb: ``metaopt replay RUN_OR_FILE`` trains one model with a schedule a PBT sweep discovered.

The verb reaches the CLI through pbt's :class:`~metaopt.registry.Capability` (``commands=(REPLAY,)``), so
:mod:`metaopt.cli` names no capability. Declaring the arguments imports only argparse; :func:`run_replay`, and
with it the task, torch and MLflow, is imported only when the verb runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metaopt.redact import REDACTED
from metaopt.registry import Command


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_FILE", help="MLflow sweep run id, or a schedules.json file")
    parser.add_argument("--trial", help="trial id (default: the sweep's best)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow URI holding the run")


def run_replay(args: argparse.Namespace) -> int:
    """Replay the chosen trial's schedule and log the replay under the sweep's MLflow run."""
    from metaopt import config
    from metaopt.pbt import replay

    payload = replay.load_payload(args.source, args.tracking_uri)
    result = replay.replay(payload, args.trial)
    uri = payload["experiment"]["tracking"]["uri"] if config.exists(Path(args.source)) else args.tracking_uri
    if f"{REDACTED}@" in uri:  # schedules.json never holds credentials: the replay goes where --tracking-uri says
        uri = args.tracking_uri
    run_id = replay.log_replay(result, payload, uri)
    print(
        f"replay of trial {result.trial_id}: {result.metric} {result.replay_metric:.4f} "
        f"(PBT trial: {result.pbt_metric:.4f}, difference {result.difference:+.4f}) "
        f"after {result.steps} steps in {result.seconds:.1f}s; MLflow run {run_id}"
    )
    return 0


REPLAY = Command(
    name="replay",
    help="train one model with a learning-rate schedule a PBT sweep discovered",
    add_arguments=add_replay_arguments,
    handler="metaopt.pbt.commands:run_replay",
)
