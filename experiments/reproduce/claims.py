"""The claims of issue 23 ("Claims, measured") as data, and the pure steps from a run's rows to the printed table.

A :class:`Claim` names its arms and the comparisons that decide it. An :class:`Arm` is one measured quantity: the
``metric`` of the rows of an experiment file (run with ``overrides``, the ``--set`` strings of ``metaopt run``) that
match ``select``, one value per seed. Two ways to get a value per seed:

- ``reduce: row``: the file sweeps the seeds itself (``seed_field`` is the section's list of seeds, e.g.
  ``posttrain.seeds``): one run, each matching row is one seed (its ``seed`` key);
- ``reduce: best``: each seed is a run of its own (``seed_field`` is the section's single seed, e.g. ``pbt.seed``;
  a PBT sweep per seed): the per-seed value is the best matching row of that seed's run (``mode``);
- ``reduce: returns``: one run whose matching row holds a list of per-seed values (``metric``, e.g. an
  ``lpo_eval`` cell's ``returns``; ``seed_field`` is the section's seed count, e.g. ``lpo_eval.seeds``): the i-th
  value is seed i.

A two-stage claim lists ``prepare`` runs (:class:`Prepare`, e.g. meta-training a drift) made before its arms; each
one's MLflow run id replaces ``{label}`` in the arms' overrides and select values (:func:`resolve`). A claim with
``meta_seeds`` repeats both stages per meta-seed k, as an independent replicate: each prepare step with
``{seed_field}=[k]`` and every arm's run with its own evaluation seeds (``{eval_seed_field}=k * EVAL_SEED_STRIDE``,
:func:`for_meta_seed`). k is the unit of the interval: an arm's value for k is its mean over the evaluation seeds of
k's run (:func:`combine_meta_seeds`; NaN and an error when any is missing), so comparisons pair by meta-seed and
cover both the meta-training's and the evaluation's variance.

Runs with the same (file, overrides) are run once and shared by the arms that need them. A comparison is the paired
per-seed difference arm - baseline with its Student-t interval (:func:`metaopt.stats.paired_difference`) and a
verdict. Nothing here runs anything: ``run.py`` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from metaopt.stats import Interval, mean_interval, paired_difference, verdict

DEFAULT_SEEDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class Arm:
    """One measured quantity of a claim (see the module for ``reduce``); ``file`` is relative to this folder."""

    label: str
    file: str
    metric: str
    select: Mapping[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    mode: Literal["max", "min"] = "max"
    reduce: Literal["row", "best", "returns"] = "row"
    seed_field: str = ""
    seeds: tuple[int, ...] = DEFAULT_SEEDS


@dataclass(frozen=True)
class Prepare:
    """A run made before a two-stage claim's arms (e.g. meta-training a drift the arms then evaluate): its MLflow
    run id replaces every ``{label}`` in the arms' overrides and select values (:func:`resolve`); ``quick``: its
    own smoke-test overrides."""

    label: str
    file: str
    overrides: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    seed_field: str = ""  # the section's list of meta-seeds (e.g. lpo.meta_seeds), set to [k] per meta-seed k


@dataclass(frozen=True)
class Claim:
    """A paper's claim: what the paper reports, the arms that measure it here, (arm, baseline) comparisons, and
    the ``quick`` overrides (added to every arm's) that shrink the budget for a smoke test; ``meta_seeds``: the
    meta-training seeds of a two-stage claim whose intervals run over them, ``eval_seed_field``: the arms' first
    evaluation seed, moved per meta-seed (see the module)."""

    id: str
    title: str
    paper: str
    arms: tuple[Arm, ...]
    comparisons: tuple[tuple[str, str], ...]
    quick: tuple[str, ...] = ()
    prepare: tuple[Prepare, ...] = ()
    meta_seeds: tuple[int, ...] = ()
    eval_seed_field: str = ""  # with meta_seeds: the arms' first-seed field, moved by EVAL_SEED_STRIDE per meta-seed


EVAL_SEED_STRIDE = 1000  # meta-seed k evaluates on seeds k * 1000, k * 1000 + 1, ...: no two replicates share one


@dataclass(frozen=True)
class RunKey:
    """What identifies one run: the file and every override (the seed ones included), in order."""

    file: str
    overrides: tuple[str, ...]


@dataclass
class RunOutcome:
    """A finished (or failed) run: its rows, wall time in seconds and, when it did not complete, why."""

    rows: list[dict[str, Any]]
    wall_s: float
    error: str | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class ArmResult:
    """An arm's per-seed values, their interval, the wall time of its runs and the errors of those that failed."""

    arm: Arm
    values: dict[int, float]
    interval: Interval
    wall_s: float
    errors: tuple[str, ...]


R5_SEC_QUICK = (
    "posttrain.steps=2",
    "posttrain.steps_per_iteration=1",
    "posttrain.warmup.steps=4",
    "posttrain.eval_per_category=2",
    "posttrain.samples_to_log=0",
)


def sec_claim(claim_id: str, file: str, workload: str) -> Claim:
    """R5 on one workload: SEC, uniform and hard->easy of one posttrain file (one shared run, 5 seeds), SEC paired
    against each baseline on final held-out accuracy."""
    return Claim(
        id=claim_id,
        title=f"SEC beats a uniform and a hard->easy curriculum at the same GRPO budget, {workload} (Chen et al. 2025)",
        paper="Countdown: hard->easy ~0.0 vs random ~0.4; SEC at or above random on every task",
        arms=tuple(
            Arm(
                label=name,
                file=file,
                metric="final_accuracy",
                select={"curriculum": name},
                reduce="row",
                seed_field="posttrain.seeds",
            )
            for name in ("sec", "uniform", "hard_to_easy")
        ),
        comparisons=(("sec", "uniform"), ("sec", "hard_to_easy")),
        quick=R5_SEC_QUICK,
    )


def pbt_claim(
    claim_id: str, file: str, workload: str, paper: str, *, mode: Literal["max", "min"], quick: tuple[str, ...]
) -> Claim:
    """R1 on one workload: PBT, the best fixed lr and the tuned cosine schedule of one pbt file at the same budget
    (population x iterations x steps), one sweep per seed, each sweep's best trial's final metric; PBT paired
    against each baseline."""
    return Claim(
        id=claim_id,
        title=f"PBT beats the best fixed lr and matches a tuned cosine schedule at equal budget, {workload} "
        "(Jaderberg et al. 2017)",
        paper=paper,
        arms=tuple(
            Arm(
                label=label,
                file=file,
                metric="final_metric",
                overrides=overrides,
                mode=mode,
                reduce="best",
                seed_field="pbt.seed",
            )
            for label, overrides in (
                ("pbt", ()),
                ("fixed", ("pbt.scheduler=grid", "pbt.lr_schedule=constant")),
                ("cosine", ("pbt.scheduler=grid", "pbt.lr_schedule=cosine")),
            )
        ),
        comparisons=(("pbt", "fixed"), ("pbt", "cosine")),
        quick=quick,
    )


R4_ADAMW = "R4_search_from_adamw.yaml"
R4_BROKEN = "R4_search_from_broken_lion.yaml"
R4_META = "final.funnel.0.stages.-1"  # a search row's best program's meta-validation stage (row_value's path)

CLAIMS: dict[str, Claim] = {
    "R5": sec_claim("R5", "R5_sec_arithmetic.yaml", "5-level arithmetic"),
    "R5-gym": sec_claim("R5-gym", "R5_sec_reasoning_gym.yaml", "reasoning-gym mix"),
    "R1": pbt_claim(
        "R1",
        "R1_pbt_tiny_lm.yaml",
        "tiny LM validation loss",
        "Transformer on WMT'14 En-De: PBT's BLEU above the hand-tuned schedule's (a small gain; the paper's Table 1)",
        mode="min",  # the sweep's best trial's final val_loss
        quick=("pbt.population=2", "pbt.iterations=4", "pbt.steps_per_iteration=5", "pbt.perturbation_interval=2"),
    ),
    "R1b": pbt_claim(
        "R1b",
        "R1_pbt_cartpole_rllib.yaml",
        "RLlib PPO CartPole return",
        "deep RL (A3C/FuN on Atari, DeepMind Lab): PBT above the hand-tuned and random-search baselines",
        mode="max",  # the sweep's best trial's final episode_return_mean
        quick=("pbt.population=2", "pbt.iterations=2", "pbt.perturbation_interval=1"),
    ),
    "R2": Claim(
        id="R2",
        title="FedHyper-G recovers from a 10x too small initial lr and converges faster than FedAvg at a good lr "
        "(Wang, Wang, Li, ICLR 2024)",
        paper="at a suboptimal lr FedHyper up to +15% accuracy over FedAvg, reaching FedAvg-at-a-good-lr; "
        "1.1-3x faster convergence at a good lr",
        arms=(
            *(
                Arm(
                    label=f"{strategy}_lr{lr:g}{suffix}",
                    file="R2_fedhyper_lr_robustness.yaml",
                    metric=metric,
                    select={"strategy": strategy, "lr": lr},
                    overrides=(f"federated.strategies=[{strategy}]", f"federated.lrs={list(lrs)}"),
                    mode=mode,
                    seed_field="federated.seeds",
                )
                for strategy, lrs in (("fedavg", (0.01, 0.05, 0.1, 0.2)), ("fedhyper_g", (0.01, 0.1)))
                for lr in lrs
                for suffix, metric, mode in (
                    ("", "final_accuracy", "max"),
                    (":rounds", "rounds_to_target", "min"),
                    (":global_lr", "final_global_lr", "max"),
                )
                if suffix == "" or (lr == 0.1 and suffix == ":rounds") or (strategy != "fedavg" and suffix)
            ),
        ),
        comparisons=(
            ("fedhyper_g_lr0.01", "fedavg_lr0.01"),
            ("fedhyper_g_lr0.01", "fedavg_lr0.1"),
            ("fedhyper_g_lr0.01", "fedavg_lr0.2"),  # FedAvg's best lr of the grid (RESULTS.md)
            ("fedhyper_g_lr0.1:rounds", "fedavg_lr0.1:rounds"),
        ),
        quick=("federated.rounds=2",),
    ),
    "R2-local": Claim(
        id="R2-local",
        title="FedHyper's local-lr schedulers (SL, and the full GM + CL) recover from a 10x too small initial lr "
        "(Wang, Wang, Li, ICLR 2024): the global rate alone can grow at most 5x (a <= 4)",
        paper="at a suboptimal lr FedHyper up to +15% accuracy over FedAvg, reaching FedAvg-at-a-good-lr",
        arms=tuple(
            Arm(
                label=f"{strategy}_lr{lr:g}",
                file="R2_fedhyper_lr_robustness.yaml",
                metric="final_accuracy",
                select={"strategy": strategy, "lr": lr},
                overrides=(f"federated.strategies=[{strategy}]", f"federated.lrs=[{lr}]"),
                seed_field="federated.seeds",
            )
            for strategy, lr in (
                ("fedavg", 0.01),
                ("fedavg", 0.2),
                ("fedhyper_sl", 0.01),
                ("fedhyper_full", 0.01),
            )
        ),
        comparisons=(
            ("fedhyper_sl_lr0.01", "fedavg_lr0.01"),
            ("fedhyper_full_lr0.01", "fedavg_lr0.01"),
            ("fedhyper_sl_lr0.01", "fedavg_lr0.2"),
            ("fedhyper_full_lr0.01", "fedavg_lr0.2"),
        ),
        quick=("federated.rounds=2",),
    ),
    "R3": Claim(
        id="R3",
        title="LPO meta-trained on CartPole-v1 at 50k steps matches PPO there; TA-LPO beats LPO at horizons it was "
        "not trained on (Lu et al. 2022; Jackson et al. 2024)",
        paper="LPO >= PPO on its meta-training env; TA-LPO > LPO at unseen training horizons (x0.5, x2)",
        prepare=tuple(
            Prepare(
                label=drift,
                file="R3_lpo_meta.yaml",
                overrides=(f"lpo.drift={drift}",),
                quick=("lpo.es.generations=1", "lpo.es.population=4", "lpo.baseline_seeds=2", "lpo.eval_seeds=2"),
                seed_field="lpo.meta_seeds",
            )
            for drift in ("lpo", "ta_lpo")
        ),
        arms=tuple(
            Arm(
                label=f"{name}_x{horizon:g}",
                file="R3_lpo_eval.yaml",
                metric="returns",
                select={"objective": objective, "problem": f"CartPole-v1_{round(50000 * horizon)}"},
                overrides=('lpo_eval.objectives=[ppo, "mlflow:{lpo}", "mlflow:{ta_lpo}"]',),
                reduce="returns",
                seed_field="lpo_eval.seeds",
                seeds=tuple(range(8)),
            )
            for horizon in (0.5, 1.0, 2.0)
            for name, objective in (("ppo", "ppo"), ("lpo", "mlflow:{lpo}"), ("ta_lpo", "mlflow:{ta_lpo}"))
        ),
        comparisons=(("lpo_x1", "ppo_x1"), ("ta_lpo_x0.5", "lpo_x0.5"), ("ta_lpo_x2", "lpo_x2")),
    ),
    "R4": Claim(
        id="R4",
        title="Evolution from AdamW finds a program beating AdamW (both at tuned lr) on meta-validation; from "
        "Lion with one statement broken it recovers Lion's score (Chen et al. 2023)",
        paper="Lion found from AdamW beats AdamW on every meta-validation task; no broken-start check in the paper",
        arms=(
            *(
                Arm(label, R4_ADAMW, f"{R4_META}.{key}", reduce="row", seed_field="symbolic.seeds")
                for label, key in (("best_from_adamw", "score"), ("adamw", "start_score"))
            ),
            *(
                Arm(label, R4_BROKEN, f"{R4_META}.{key}", reduce="row", seed_field="symbolic.seeds")
                for label, key in (("best_from_broken_lion", "score"), ("broken_lion", "start_score"))
            ),
            Arm(
                "lion",
                R4_BROKEN,
                f"{R4_META}.start_score",
                overrides=("symbolic.start=lion", "symbolic.evaluations=1", "symbolic.batch=1"),
                reduce="row",
                seed_field="symbolic.seeds",
            ),
        ),
        comparisons=(
            ("best_from_adamw", "adamw"),
            ("best_from_broken_lion", "lion"),
            ("best_from_broken_lion", "broken_lion"),
        ),
        quick=(
            "symbolic.evaluations=3",
            "symbolic.batch=1",
            "symbolic.proxy.steps=5",
            "symbolic.meta_validation.steps=5",
            "symbolic.meta_validation.seeds=1",
        ),
    ),
}
# R3 with the meta-training seed as the interval's unit: per meta-seed k, both drifts meta-trained with seed k and
# all three objectives evaluated on 8 seeds of their own (from k * EVAL_SEED_STRIDE; k = 0 is R3's run), each arm's
# value per k the mean over them. Every k is an independent replicate of R3, so the interval over k covers the
# meta-training's and the evaluation's variance, PPO's included.
CLAIMS["R3-meta"] = replace(
    CLAIMS["R3"],
    id="R3-meta",
    title=CLAIMS["R3"].title + "; intervals over meta-training seeds",
    meta_seeds=(0, 1, 2),
    eval_seed_field="lpo_eval.seed",
)


def arm_seeds(arm: Arm, seeds: int | None) -> tuple[int, ...]:
    """The arm's seeds, or the first ``seeds`` of 0, 1, ... when the command line asks for a number."""
    return arm.seeds if seeds is None else tuple(range(seeds))


def arm_runs(arm: Arm, seeds: Sequence[int], extra: Sequence[str] = ()) -> list[tuple[int | None, RunKey]]:
    """(seed, run) pairs the arm needs: one run over all seeds (``row``; seed None) or one run per seed (``best``)."""
    base = (*arm.overrides, *extra)
    if arm.reduce == "returns":
        return [(None, RunKey(arm.file, (*base, f"{arm.seed_field}={len(seeds)}")))]
    if arm.reduce == "row":
        return [(None, RunKey(arm.file, (*base, f"{arm.seed_field}={list(seeds)}")))]
    return [(seed, RunKey(arm.file, (*base, f"{arm.seed_field}={seed}"))) for seed in seeds]


def planned_runs(claim: Claim, seeds: int | None = None, quick: bool = False) -> list[RunKey]:
    """Every distinct run the claim needs, in first-use order (arms sharing a run share it)."""
    extra = claim.quick if quick else ()
    keys: list[RunKey] = []
    for arm in claim.arms:
        for _, key in arm_runs(arm, arm_seeds(arm, seeds), extra):
            if key not in keys:
                keys.append(key)
    return keys


def matches(row: Mapping[str, Any], select: Mapping[str, Any]) -> bool:
    """The row has every selected key at the selected value."""
    return all(row.get(key) == value for key, value in select.items())


def finite(value: Any) -> float:
    """The value as a float, NaN when it is missing or not a number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def row_value(row: Mapping[str, Any], metric: str) -> Any:
    """The row's ``metric`` key or, when the row has no such key, the value at its dotted path: a mapping's key,
    a sequence's index (negative counts from the end) or an attribute per part, e.g.
    ``final.funnel.0.stages.-1.score`` (a symbolic search row: its best program's meta-validation score); None
    when the path leads nowhere."""
    if metric in row:
        return row[metric]
    value: Any = row
    for part in metric.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, Sequence) and not isinstance(value, str):
            try:
                value = value[int(part)]
            except (ValueError, IndexError):
                return None
        else:
            value = getattr(value, part, None)
        if value is None:
            return None
    return value


def best_value(values: Iterable[float], mode: str) -> float:
    """The best finite value (highest for max, lowest for min), NaN when none is finite."""
    kept = [v for v in values if math.isfinite(v)]
    if not kept:
        return math.nan
    return max(kept) if mode == "max" else min(kept)


def per_seed_values(arm: Arm, runs: Sequence[tuple[int | None, Sequence[Mapping[str, Any]]]]) -> dict[int, float]:
    """seed -> the arm's value, from (seed, rows) of its runs: each matching row keyed by its ``seed`` (``row``), or
    the best matching row of each seed's run (``best``)."""
    values: dict[int, float] = {}
    for seed, rows in runs:
        chosen = [row for row in rows if matches(row, arm.select)]
        if arm.reduce == "returns":
            values.update(returns_values(chosen, arm.metric))
        elif arm.reduce == "row":
            for row in chosen:
                values[int(row["seed"])] = finite(row_value(row, arm.metric))
        else:
            values[int(seed)] = best_value((finite(row.get(arm.metric)) for row in chosen), arm.mode)
    return values


def arm_result(
    arm: Arm, seeds: Sequence[int], outcomes: Mapping[RunKey, RunOutcome], extra: Sequence[str] = (), level=0.95
) -> ArmResult:
    """The arm's values from the outcomes of its runs (a run missing from ``outcomes`` counts as failed)."""
    pairs = arm_runs(arm, seeds, extra)
    found = [(seed, outcomes.get(key)) for seed, key in pairs]
    errors = tuple(sorted({"not run" if outcome is None else outcome.error for _, outcome in found if not ok(outcome)}))
    values = per_seed_values(arm, [(seed, outcome.rows) for seed, outcome in found if outcome is not None])
    wall = sum(outcome.wall_s for _, outcome in found if outcome is not None)
    return ArmResult(arm, values, mean_interval(values.values(), level), wall, errors)


def ok(outcome: RunOutcome | None) -> bool:
    return outcome is not None and outcome.error is None


def comparison_lines(
    claim: Claim, results: Mapping[str, ArmResult], level: float = 0.95
) -> list[tuple[str, str, Interval, str]]:
    """(arm, baseline, interval of the paired mean difference, verdict) per comparison of the claim."""
    lines = []
    for label, baseline in claim.comparisons:
        difference = paired_difference(results[label].values, results[baseline].values, level)
        lines.append((label, baseline, difference, verdict(difference, results[label].arm.mode)))
    return lines


def number(value: float, digits: int = 4) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.{digits}f}"


def interval_text(interval: Interval) -> str:
    return f"[{number(interval.low)}, {number(interval.high)}]"


def format_table(claim: Claim, results: Mapping[str, ArmResult], level: float = 0.95, note: str = "") -> str:
    """The markdown table: arm | metric mean | interval | seeds | wall time (a failed run says so), then one line
    per comparison with its paired difference, interval and verdict, then ``note`` (e.g. :func:`meta_seed_note`)."""
    percent = f"{level:.0%}"
    lines = [
        f"**{claim.id}**: {claim.title}. Paper: {claim.paper}.",
        "",
        f"| arm | metric | mean | {percent} interval | seeds | wall (s) | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results.values():
        status = "FAILED: " + "; ".join(result.errors) if result.errors else "ok"
        lines.append(
            f"| {result.arm.label} | {result.arm.metric} ({result.arm.mode}) | {number(result.interval.mean)} | "
            f"{interval_text(result.interval)} | {result.interval.n} | {result.wall_s:.0f} | {status} |"
        )
    lines += [
        "",
        f"| comparison | mean difference | {percent} interval | paired seeds | verdict |",
        "|---|---|---|---|---|",
    ]
    for label, baseline, difference, word in comparison_lines(claim, results, level):
        lines.append(
            f"| {label} - {baseline} | {number(difference.mean)} | {interval_text(difference)} | {difference.n} | "
            f"{word} at {percent} |"
        )
    if note:
        lines += ["", note]
    return "\n".join(lines)


def failed(results: Mapping[str, ArmResult]) -> bool:
    """Some arm's run did not complete."""
    return any(result.errors for result in results.values())


def returns_values(rows: Iterable[Mapping[str, Any]], metric: str) -> dict[int, float]:
    """``reduce: returns``: the matching row's list of per-seed values (an ``lpo_eval`` cell's ``returns``, one
    final return per eval seed, the same seeds for every objective), keyed by the seed's index."""
    values: dict[int, float] = {}
    for row in rows:
        values.update({i: finite(value) for i, value in enumerate(row.get(metric) or [])})
    return values


def resolve(claim: Claim, run_ids: Mapping[str, str]) -> Claim:
    """The claim with every ``{label}`` of a prepare step in its arms' overrides and string select values
    replaced by that step's MLflow run id (an ``lpo_eval`` arm names the drift as ``mlflow:{label}``)."""

    def fill(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        for label, run_id in run_ids.items():
            text = text.replace("{" + label + "}", run_id)
        return text

    arms = tuple(
        replace(
            arm,
            overrides=tuple(fill(o) for o in arm.overrides),
            select={key: fill(value) for key, value in arm.select.items()},
        )
        for arm in claim.arms
    )
    return replace(claim, arms=arms)


def prepare_lines(
    prepared: Sequence[tuple[Prepare, RunOutcome]], meta_seed: int | None = None, quick: bool = False
) -> str:
    """One line per prepare step: its run, wall time and, for a meta-training (``lpo`` rows), each trial's
    generations, last population-mean fitness and the ES mean's evaluation-score curve (1.0 = PPO);
    ``meta_seed``, ``quick``: the steps ran for that meta-seed, with their quick overrides (shown)."""
    lines = []
    for step, outcome in prepared:
        overrides = prepare_key(step, quick, meta_seed).overrides
        head = f"- prepare {step.label} ({step.file} {' '.join(overrides)}): run {outcome.run_id}, "
        head += f"{outcome.wall_s:.0f} s" + (f", FAILED: {outcome.error}" if outcome.error else "")
        lines.append(head)
        for row in outcome.rows:
            scores = row.get("curves", {}).get("mean_score", ([], []))
            curve = ", ".join(f"g{g}: {number(v, 3)}" for g, v in zip(*scores, strict=False))
            lines.append(
                f"  - meta-seed {row.get('meta_seed')}: {row.get('generations')} generations, last population "
                f"fitness {number(finite(row.get('fitness_mean')), 3)}; ES-mean score (1.0 = PPO) {curve}"
            )
    return "\n".join(lines)


def prepare_key(step: Prepare, quick: bool = False, meta_seed: int | None = None) -> RunKey:
    """The prepare step's run: its overrides, its quick ones when asked and, for meta-seed k, ``{seed_field}=[k]``."""
    overrides = (*step.overrides, *(step.quick if quick else ()))
    if meta_seed is not None:
        if not step.seed_field:
            raise ValueError(f"prepare step {step.label} has no seed_field for meta-seed {meta_seed}")
        overrides += (f"{step.seed_field}=[{meta_seed}]",)
    return RunKey(step.file, overrides)


def claim_meta_seeds(claim: Claim, meta_seeds: int | None = None) -> tuple[int, ...]:
    """The claim's meta-seeds, or 0..N-1 when the command line asks for N."""
    return claim.meta_seeds if meta_seeds is None else tuple(range(meta_seeds))


def for_meta_seed(claim: Claim, meta_seed: int) -> Claim:
    """The claim as meta-seed k's replicate: every arm's run also sets ``{eval_seed_field}=k * EVAL_SEED_STRIDE``
    (its own evaluation seeds); unchanged when the claim names no such field."""
    if not claim.eval_seed_field:
        return claim
    extra = f"{claim.eval_seed_field}={meta_seed * EVAL_SEED_STRIDE}"
    return replace(claim, arms=tuple(replace(arm, overrides=(*arm.overrides, extra)) for arm in claim.arms))


def meta_seed_value(result: ArmResult, expected: int, level: float = 0.95) -> tuple[float, tuple[str, ...]]:
    """Meta-seed k's value of an arm: the mean over its evaluation seeds, and k's errors; NaN, with an error, when
    fewer than ``expected`` of them are finite (a mean over fewer seeds would not pair with the other arms')."""
    finite_values = [value for value in result.values.values() if math.isfinite(value)]
    if result.errors:
        return math.nan, result.errors
    if len(finite_values) != expected:
        return math.nan, (f"{len(finite_values)}/{expected} evaluation seeds finite",)
    return mean_interval(finite_values, level).mean, ()


def combine_meta_seeds(
    claim: Claim, per_meta_seed: Mapping[int, Mapping[str, ArmResult]], seeds: int | None = None, level: float = 0.95
) -> dict[str, ArmResult]:
    """Per arm, one value per meta-seed k (:func:`meta_seed_value`, ``seeds``: the evaluation seeds asked for);
    the interval runs over the meta-seeds, wall is the sum over them, errors their union, each naming its k."""
    combined = {}
    for arm in claim.arms:
        expected = len(arm_seeds(arm, seeds))
        values, errors = {}, set()
        for k, by_label in per_meta_seed.items():
            values[k], k_errors = meta_seed_value(by_label[arm.label], expected, level)
            errors |= {
                error if error.startswith("prepare failed at") else f"meta-seed {k}: {error}" for error in k_errors
            }
        combined[arm.label] = ArmResult(
            arm,
            values,
            mean_interval(values.values(), level),
            sum(result[arm.label].wall_s for result in per_meta_seed.values()),
            tuple(sorted(errors)),
        )
    return combined


def meta_seed_note(claim: Claim, meta_seeds: Sequence[int], seeds: int | None = None) -> str:
    """The line under a meta-seed claim's table: what its seeds column counts."""
    counts = sorted({len(arm_seeds(arm, seeds)) for arm in claim.arms})
    each = " or ".join(str(n) for n in counts)
    return (
        f"seeds = meta-training seeds ({', '.join(str(k) for k in meta_seeds)}); each value is the mean over "
        f"{each} evaluation seeds of that meta-seed's run"
        + (f" (its own: from k * {EVAL_SEED_STRIDE})" if claim.eval_seed_field else "")
        + ", comparisons pair by meta-seed"
    )
