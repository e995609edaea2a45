"""Measure a claim of issue 23: run its arms through ``metaopt.run`` and print the table with 95% intervals.

    python experiments/reproduce/run.py R5 [--seeds N] [--quick] [--results PATH]
    python experiments/reproduce/run.py R3-meta [--meta-seeds N] [--seeds N] [--quick]

Run from the repository root (the experiment files' relative paths, the MLflow database). Every distinct run of
the claim (:func:`claims.planned_runs`) runs once; the table (:func:`claims.format_table`) is printed, logged as
one MLflow summary run (experiment ``reproduce``, in the tracking URI of the claim's first file: params claim,
commit, seeds, quick; metrics ``<arm>.mean/low/high``; ``table.md``) and appended with date, commit, machine and
total wall time to ``RESULTS.md`` beside this file (``--quick``, a smoke test, appends only to an explicit
``--results``). Exit status 1 when a run failed or was stopped (the table says which arm), 2 on a bad claim or
config. A claim with meta-seeds (R3-meta) runs its two stages once per meta-seed (:func:`measure_meta`;
``--meta-seeds N``: 0..N-1) and its intervals run over the meta-seeds; ``--seeds`` still counts evaluation seeds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import claims as registry  # noqa: E402

RESULTS = HERE / "RESULTS.md"
MLFLOW_EXPERIMENT = "reproduce"


def git_commit() -> str:
    """The short commit of the working tree (``+dirty`` when it has changes), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty.strip() else "")


def run_one(key: registry.RunKey) -> registry.RunOutcome:
    """One run through the Python API; a failed trial, a stop or an error becomes the outcome's ``error``."""
    import metaopt
    from metaopt.errors import ConfigError

    started = time.time()
    print(f"[reproduce] {key.file} {' '.join(key.overrides)}", flush=True)
    try:
        result = metaopt.run(HERE / key.file, overrides=key.overrides)
    except ConfigError:
        raise
    except KeyboardInterrupt as stop:  # metaopt.session.SweepStopped included
        return registry.RunOutcome([], time.time() - started, f"stopped ({stop})")
    except Exception as err:  # the table reports it and the script exits non-zero
        return registry.RunOutcome(
            [], time.time() - started, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        )
    error = None if result.complete else "failed trials: " + ", ".join(f"{t} ({e})" for t, e in result.failed)
    return registry.RunOutcome(list(result.rows), time.time() - started, error, result.run_id)


def prepare_claim(
    claim: registry.Claim, quick: bool, runner=run_one, meta_seed: int | None = None
) -> list[tuple[registry.Prepare, registry.RunOutcome]]:
    """Run the claim's prepare steps in order (a two-stage claim's first stage; for ``meta_seed`` k each with
    ``{seed_field}=[k]``); a step without an MLflow run fails."""
    prepared = []
    for step in claim.prepare:
        outcome = runner(registry.prepare_key(step, quick, meta_seed))
        if outcome.error is None and not outcome.run_id:
            outcome.error = "no MLflow run"
        prepared.append((step, outcome))
    return prepared


def measure_prepared(claim: registry.Claim, seeds: int | None, quick: bool, runner=None, meta_seed: int | None = None):
    """The prepare steps (for ``meta_seed`` if given), then the arms of the claim resolved with their run ids
    (:func:`measure`); when a step failed, no arm runs and each says so. Returns (prepared, results). ``runner``
    defaults to this module's ``run_one`` as it is at call time."""
    runner = runner or run_one
    prepared = prepare_claim(claim, quick, runner, meta_seed)
    failures = [step.label for step, outcome in prepared if outcome.error]
    if failures:
        where = "" if meta_seed is None else f" at meta-seed {meta_seed}"
        return prepared, failed_arms(claim, seeds, quick, f"prepare failed{where}: " + ", ".join(failures))
    run_ids = {step.label: outcome.run_id for step, outcome in prepared}
    return prepared, measure(registry.resolve(claim, run_ids), seeds, quick, runner)


def failed_arms(claim: registry.Claim, seeds: int | None, quick: bool, message: str) -> dict[str, registry.ArmResult]:
    """Every arm of the claim failed with ``message``, nothing run."""
    return measure(claim, seeds, quick, lambda key: registry.RunOutcome([], 0.0, message))


def measure_meta(
    claim: registry.Claim, seeds: int | None, meta_seeds: Sequence[int], quick: bool, runner=None
) -> tuple[dict[int, list[tuple[registry.Prepare, registry.RunOutcome]]], dict[str, registry.ArmResult]]:
    """Both stages once per meta-seed k, in order (:func:`measure_prepared`; a failed prepare at k fails every
    arm, naming k, and the next k still runs), then each arm's per-k eval-seed means combined into one interval
    over the meta-seeds (:func:`claims.combine_meta_seeds`). Returns ({k: prepared}, results)."""
    from metaopt.errors import ConfigError

    prepared: dict[int, list[tuple[registry.Prepare, registry.RunOutcome]]] = {}
    per_meta_seed: dict[int, dict[str, registry.ArmResult]] = {}
    for k in meta_seeds:
        try:
            prepared[k], per_meta_seed[k] = measure_prepared(
                registry.for_meta_seed(claim, k), seeds, quick, runner, meta_seed=k
            )
        except ConfigError as err:
            if k == meta_seeds[0]:
                raise  # a bad claim or file: nothing measured yet, exit 2
            # a later meta-seed's run refused (e.g. its drift has no artifact): keep the meta-seeds measured so far
            prepared[k] = []
            per_meta_seed[k] = failed_arms(claim, seeds, quick, f"ConfigError: {(str(err).splitlines() or [''])[0]}")
    return prepared, registry.combine_meta_seeds(claim, per_meta_seed, seeds)


def measure(claim: registry.Claim, seeds: int | None, quick: bool, runner=run_one) -> dict[str, registry.ArmResult]:
    """Run every distinct run of the claim once (``runner``: RunKey -> RunOutcome) and compute each arm."""
    outcomes = {key: runner(key) for key in registry.planned_runs(claim, seeds, quick)}
    extra = claim.quick if quick else ()
    return {arm.label: registry.arm_result(arm, registry.arm_seeds(arm, seeds), outcomes, extra) for arm in claim.arms}


def tracking_uri(claim: registry.Claim) -> str:
    """The tracking URI of the claim's first experiment file."""
    import metaopt.api

    return metaopt.api.load(HERE / claim.arms[0].file).tracking.uri


def log_summary(claim, results, table: str, params: dict[str, str]) -> None:
    """One MLflow run in experiment ``reproduce``: the params, each arm's mean and bounds, the table as text."""
    import math

    import mlflow

    from metaopt.tracking import metric_name

    mlflow.set_tracking_uri(tracking_uri(claim))
    mlflow.set_experiment(MLFLOW_EXPERIMENT)
    with mlflow.start_run(run_name=f"{claim.id}{' quick' if params.get('quick') == 'True' else ''}"):
        mlflow.log_params(params)
        metrics = {}
        for label, result in results.items():
            for stat in ("mean", "low", "high"):
                value = getattr(result.interval, stat)
                if math.isfinite(value):
                    metrics[metric_name(f"{label}.{stat}")] = value
        mlflow.log_metrics(metrics)
        mlflow.log_text(table, "table.md")


def record(path: Path, table: str, params: dict[str, str], wall_s: float) -> None:
    """Append the table with date, commit, machine and total wall time to the history file."""
    heading = (
        f"\n## {params['claim']} -- {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit "
        f"{params['commit']}, {os.cpu_count()} CPUs, total wall {wall_s / 60:.1f} min"
        f"{' (--quick)' if params['quick'] == 'True' else ''}\n\n"
        f"Command: `{params['command']}`\n\n"
    )
    if not path.exists():
        path.write_text("# Reproduction measurements (appended by run.py; newest last)\n", encoding="utf-8")
    with path.open("a", encoding="utf-8") as handle:
        handle.write(heading + table + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("claim", choices=sorted(registry.CLAIMS))
    parser.add_argument("--seeds", type=int, default=None, help="use seeds 0..N-1 instead of each arm's")
    parser.add_argument("--quick", action="store_true", help="shrink budgets (smoke test); not recorded by default")
    parser.add_argument("--results", type=Path, default=None, help=f"history file (default {RESULTS.name})")
    parser.add_argument(
        "--meta-seeds",
        type=int,
        default=None,
        help="use meta-training seeds 0..N-1 (a claim with meta-seeds, e.g. R3-meta); --seeds stays eval seeds",
    )
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 2:
        parser.error("--seeds must be >= 2 for an interval")
    claim = registry.CLAIMS[args.claim]
    if args.meta_seeds is not None and not claim.meta_seeds:
        parser.error(f"--meta-seeds needs a claim with meta-seeds; {claim.id} has none")
    if args.meta_seeds is not None and args.meta_seeds < 2:
        parser.error("--meta-seeds must be >= 2 for an interval")
    from metaopt.errors import ConfigError

    meta_seeds = registry.claim_meta_seeds(claim, args.meta_seeds)
    started = time.time()
    try:
        if meta_seeds:
            prepared_by_seed, results = measure_meta(claim, args.seeds, meta_seeds, args.quick)
        else:
            prepared, results = measure_prepared(claim, args.seeds, args.quick)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    wall = time.time() - started
    if meta_seeds:
        table = registry.format_table(claim, results, note=registry.meta_seed_note(claim, meta_seeds, args.seeds))
        table += "\n\n" + "\n".join(
            registry.prepare_lines(p, meta_seed=k, quick=args.quick) for k, p in prepared_by_seed.items()
        )
    else:
        table = registry.format_table(claim, results)
        if prepared:
            table += "\n\n" + registry.prepare_lines(prepared)
    print(table, flush=True)
    params = {
        "claim": claim.id,
        "commit": git_commit(),
        "seeds": str(args.seeds or "arm default"),
        "quick": str(args.quick),
        "command": "python experiments/reproduce/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if meta_seeds:
        params["meta_seeds"] = str(list(meta_seeds))
    results_file = args.results if args.results is not None else (None if args.quick else RESULTS)
    if results_file is not None:
        record(results_file, table, params, wall)  # first: a tracking failure must not lose the measurement
    log_summary(claim, results, table, params)
    print(f"[reproduce] {claim.id}: {wall / 60:.1f} min", flush=True)
    return 1 if registry.failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
