"""PBT's best trial vs the best fixed-learning-rate trial of the equal-budget baseline, on digits, over seeds.

    .venv/bin/python benchmarks/pbt_vs_fixed.py [--seeds 0 1 2] [--population 4] [--iterations 20]
        [--steps-per-iteration 50] [--perturbation-interval 4] [--lr-min 1e-4] [--lr-max 0.5]
        [--set KEY=VALUE ...] [--stall-seconds 180] [--show-sweep-output]

For every seed, the same experiment (experiments/pbt_digits.yaml if it exists, else experiments/quickstart.yaml,
plus the overrides) runs twice through ``metaopt.pbt.sweep.run``: with ``pbt.scheduler=pbt`` and with
``pbt.scheduler=random`` (fixed log-uniform learning rates). Both train ``population`` trials for
``iterations x steps_per_iteration`` optimizer steps each, so the budgets are equal; ``pbt.seed`` seeds the
weights, the data order and the initial learning rates, so with the same seed both start from the same
population. For each sweep the best trial (by final val_accuracy, as the sweep picks it) is recorded:

* val: its final validation accuracy as the sweep reports it;
* test: the best trial's schedule (lineage schedule for PBT, its constant lr for random) is retrained from
  scratch in this process (the few lines of ``metaopt.pbt.replay.replay``, reimplemented so the model is at
  hand) and evaluated on the digits test split, which neither the sweep nor PBT's selection saw. The replay's
  val accuracy is printed next to the sweep's as a check that the schedule reproduces the trial.

A sweep that raises, or makes no progress for ``--stall-seconds`` (a synchronous-PBT livelock was seen), is
printed as FAILED/STALLED and left out of the means. The last line is ``ratio: X.XX`` = mean PBT best
val_accuracy / mean random best val_accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from results import append, command_line
from sweep_watchdog import make_watchdog  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
SCHEDULERS = ("pbt", "random")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--population", type=int, default=4)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--steps-per-iteration", type=int, default=50)
    p.add_argument("--perturbation-interval", type=int, default=4)
    p.add_argument("--lr-min", type=float, default=1e-4)
    p.add_argument("--lr-max", type=float, default=0.5)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="further experiment overrides, e.g. pbt.synch=false",
    )
    p.add_argument(
        "--stall-seconds",
        type=float,
        default=180.0,
        help="abort a sweep after this long without trial progress (recorded as STALLED, left out of the means)",
    )
    p.add_argument("--show-sweep-output", action="store_true")
    return p.parse_args(argv)


def log(*parts) -> None:
    print(*parts, flush=True)


def experiment_file() -> Path:
    candidate = EXPERIMENTS / "pbt_digits.yaml"
    return candidate if candidate.exists() else EXPERIMENTS / "quickstart.yaml"


def retrain_and_test(section: dict, schedule: list[tuple[int, float]]) -> dict[str, float]:
    """Train the task from scratch with a step -> lr schedule (as metaopt.pbt.replay does); val and test scores."""
    import torch

    from metaopt.optim import piecewise_constant
    from metaopt.tasks import build_task

    torch.set_num_threads(1)  # as in the trials, so the replay matches them bit for bit on CPU
    lr_at = piecewise_constant(schedule)
    task = build_task(section["task"], section["task_options"], section["optimizer"], section["seed"])
    per_iteration = section["steps_per_iteration"]
    total = section["iterations"] * per_iteration
    metrics: dict[str, float] = {}
    while task.step < total:
        metrics = task.train(min(per_iteration, total - task.step), lr_at)
        if not math.isfinite(metrics.get("loss", 0.0)):
            break
    return {**metrics, **task.evaluate("test")}


def one_sweep(path: Path, overrides: list[str], show_output: bool, stall_seconds: float) -> dict:
    from metaopt import config
    from metaopt.pbt import lineage, sweep

    exp = config.load(path, overrides)
    sink = io.StringIO()
    watchdog = make_watchdog(stall_seconds)
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if not show_output:
                stack.enter_context(contextlib.redirect_stdout(sink))
            summary = sweep.run(exp, callbacks=[watchdog], verbose=0)
    except Exception as err:  # a platform failure is recorded, not fatal: the other sweeps still count
        what = (
            f"STALLED, aborted ({watchdog.stalled})"
            if watchdog.stalled is not None
            else f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
        )
        return {
            "seconds": time.perf_counter() - started,
            "diverged": 0,
            "trials": 0,
            "val": math.nan,
            "test": math.nan,
            "replay_val": math.nan,
            "schedule": what,
        }
    seconds = time.perf_counter() - started
    best = summary.best()
    row = {"seconds": seconds, "diverged": sum(t.diverged for t in summary.trials), "trials": len(summary.trials)}
    if best is None:
        return {**row, "val": math.nan, "test": math.nan, "replay_val": math.nan, "schedule": "none (all diverged)"}
    scores = retrain_and_test(exp.section.model_dump(mode="json"), best.schedule)
    return {
        **row,
        "val": best.final_metric,
        "test": scores["test_accuracy"],
        "replay_val": scores["val_accuracy"],
        "schedule": lineage.describe(best.schedule),
        "lineage_agrees": best.lineage_agrees,
    }


def mean_std(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.mean(finite):.4f} ± {std:.4f}"


def finite_mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.mean(finite) if finite else math.nan


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
    path = experiment_file()
    tmp = Path(tempfile.mkdtemp(prefix="pbt_vs_fixed_"))
    common = [
        f"pbt.population={args.population}",
        f"pbt.iterations={args.iterations}",
        f"pbt.steps_per_iteration={args.steps_per_iteration}",
        f"pbt.perturbation_interval={args.perturbation_interval}",
        f"pbt.lr_min={args.lr_min}",
        f"pbt.lr_max={args.lr_max}",
        f"ray.num_cpus={args.num_cpus}",
        *args.extra,
    ]
    log(f"experiment: {path.relative_to(REPO)} with {' '.join(common)}")
    log(
        f"  per sweep: {args.population} trials x {args.iterations} x {args.steps_per_iteration} steps "
        f"(equal budget for pbt and random); seeds {args.seeds}; scratch {tmp}"
    )

    import ray

    started = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    log(f"  Ray start-up: {time.perf_counter() - started:.1f} s")

    results: dict[tuple[int, str], dict] = {}
    for seed in args.seeds:
        for scheduler in SCHEDULERS:
            name = f"pbt-vs-fixed-{scheduler}-s{seed}"
            overrides = [
                *common,
                f"pbt.scheduler={scheduler}",
                f"pbt.seed={seed}",
                f"name={name}",
                f"ray.storage_path={tmp / 'ray_results'}",
                f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            ]
            row = one_sweep(path, overrides, args.show_sweep_output, args.stall_seconds)
            results[(seed, scheduler)] = row
            agrees = row.get("lineage_agrees")
            log(
                f"  seed {seed} {scheduler:<6}: best val {row['val']:.4f} (replay val {row['replay_val']:.4f}), "
                f"test {row['test']:.4f}; diverged {row['diverged']}/{row['trials']}; {row['seconds']:.0f} s; "
                f"schedule {row['schedule']}" + ("" if agrees in (None, True) else "  [lineage mismatch]")
            )

    log("")
    header = f"{'seed':>4} | {'pbt val':>8} {'pbt test':>8} | {'random val':>10} {'random test':>11}"
    log(header)
    log("-" * len(header))
    for seed in args.seeds:
        p, r = results[(seed, "pbt")], results[(seed, "random")]
        log(f"{seed:>4} | {p['val']:>8.4f} {p['test']:>8.4f} | {r['val']:>10.4f} {r['test']:>11.4f}")
    log("-" * len(header))
    for metric in ("val", "test"):
        p = [results[(s, "pbt")][metric] for s in args.seeds]
        r = [results[(s, "random")][metric] for s in args.seeds]
        log(
            f"best {metric:<4} accuracy, mean ± std (sample std over {len(args.seeds)} seeds): "
            f"pbt {mean_std(p)}   random {mean_std(r)}"
        )
    failed = [k for k, v in results.items() if v["schedule"].startswith(("STALLED", "FAILED"))]
    if failed:
        log(f"WARNING: {len(failed)} sweep(s) stalled or failed (see above): {failed}; the means use the others")
    wins = sum(results[(s, "pbt")]["val"] > results[(s, "random")]["val"] for s in args.seeds)
    ties = sum(results[(s, "pbt")]["val"] == results[(s, "random")]["val"] for s in args.seeds)
    log(f"pbt's best val above random's on {wins} of {len(args.seeds)} seeds ({ties} ties)")
    test_p = finite_mean(results[(s, "pbt")]["test"] for s in args.seeds)
    test_r = finite_mean(results[(s, "random")]["test"] for s in args.seeds)
    log(f"test ratio (mean pbt / mean random): {test_p / test_r:.4f}")
    ray.shutdown()
    val_p = finite_mean(results[(s, "pbt")]["val"] for s in args.seeds)
    val_r = finite_mean(results[(s, "random")]["val"] for s in args.seeds)
    log(f"val ratio (mean pbt / mean random), 4 decimals: {val_p / val_r:.4f}")
    append("pbt_vs_fixed", "pbt best val mean", val_p, command_line(argv))
    append("pbt_vs_fixed", "random best val mean", val_r, command_line(argv))
    append("pbt_vs_fixed", "ratio", val_p / val_r, command_line(argv))
    log(f"ratio: {val_p / val_r:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
