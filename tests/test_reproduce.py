"""The reproduction harness (experiments/reproduce): the claim registry is consistent with the experiment files
and what their capabilities report, runs are shared between arms, rows reduce to one value per seed, and the
table and exit status say what happened. Nothing here runs a sweep: run.py's runner is replaced by crafted rows."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import pytest

import metaopt.api
from metaopt import registry as capabilities

REPRODUCE = Path(__file__).resolve().parents[1] / "experiments" / "reproduce"
sys.path.insert(0, str(REPRODUCE))  # run.py imports its registry as ``claims``, as when run as a script


def load_script_module(name: str, filename: str):
    """A module of experiments/reproduce (a script folder, not a package), registered under ``name``."""
    spec = importlib.util.spec_from_file_location(name, REPRODUCE / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


claims = load_script_module("claims", "claims.py")


def load_run_script():
    return load_script_module("reproduce_run", "run.py")


def summary_columns(module: str) -> list[str] | None:
    """The runner module's SUMMARY_COLUMNS (the keys its rows carry), read from its source: importing it would
    import MLflow (seconds)."""
    import ast

    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SUMMARY_COLUMNS" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


ARMS = [(claim, arm) for claim in claims.CLAIMS.values() for arm in claim.arms]


@pytest.mark.parametrize(("claim", "arm"), ARMS, ids=[f"{c.id}-{a.label}" for c, a in ARMS])
def test_every_arm_file_validates_and_reports_its_metric_and_select_keys(claim, arm):
    overrides = claims.arm_runs(arm, arm.seeds, claim.quick)[0][1].overrides
    exp = metaopt.api.load(REPRODUCE / arm.file, overrides=overrides)
    section = exp.section.model_dump()
    assert arm.seed_field.split(".")[0] == exp.kind and arm.seed_field.split(".")[1] in section
    columns = summary_columns(capabilities.get(exp.kind).runner.partition(":")[0])
    if columns is not None:  # what the capability's rows carry
        assert arm.metric in columns and set(arm.select) <= set(columns)
    if "curriculum" in arm.select:
        assert arm.select["curriculum"] in exp.section.curricula


def test_every_comparison_names_arms_of_its_claim():
    for claim in claims.CLAIMS.values():
        labels = [arm.label for arm in claim.arms]
        assert len(set(labels)) == len(labels)
        assert all(a in labels and b in labels for a, b in claim.comparisons)


def test_r5_arms_share_one_run_and_seeds_override_the_list():
    r5 = claims.CLAIMS["R5"]
    (key,) = claims.planned_runs(r5)
    assert key.overrides == ("posttrain.seeds=[0, 1, 2, 3, 4]",)
    (quick,) = claims.planned_runs(r5, seeds=2, quick=True)
    assert quick.overrides[-1] == "posttrain.seeds=[0, 1]" and "posttrain.steps=2" in quick.overrides


def test_best_reduce_is_one_run_per_seed_and_takes_its_best_matching_row():
    arm = claims.Arm("pbt", "x.yaml", "loss", {"scheduler": "pbt"}, mode="min", reduce="best", seed_field="pbt.seed")
    assert [key.overrides for _, key in claims.arm_runs(arm, (0, 1))] == [("pbt.seed=0",), ("pbt.seed=1",)]
    rows0 = [{"scheduler": "pbt", "loss": 2.0}, {"scheduler": "pbt", "loss": 1.5}, {"scheduler": "grid", "loss": 0.1}]
    rows1 = [{"scheduler": "pbt", "loss": math.nan}, {"scheduler": "pbt", "loss": 3.0}]
    assert claims.per_seed_values(arm, [(0, rows0), (1, rows1)]) == {0: 1.5, 1: 3.0}


def test_row_reduce_keys_each_matching_row_by_its_seed():
    arm = claims.CLAIMS["R5"].arms[0]
    rows = [
        {"curriculum": c, "seed": s, "final_accuracy": 0.1 * s + (c == "sec")}
        for c in ("sec", "uniform")
        for s in (0, 1)
    ]
    assert claims.per_seed_values(arm, [(None, rows)]) == {0: 1.0, 1: 1.1}


def crafted_runner(fail: bool = False):
    calls = []

    def runner(key):
        calls.append(key)
        rows = [
            {"curriculum": c, "seed": s, "final_accuracy": base + 0.01 * s}
            for c, base in (("sec", 0.3), ("uniform", 0.2), ("hard_to_easy", 0.3))
            for s in range(3)
        ]
        return claims.RunOutcome(rows, 12.0, "failed trials: 00001 (boom)" if fail else None)

    return runner, calls


def test_measure_runs_the_shared_run_once_and_the_table_gives_intervals_and_verdicts():
    run = load_run_script()
    runner, calls = crafted_runner()
    results = run.measure(claims.CLAIMS["R5"], seeds=3, quick=False, runner=runner)
    assert len(calls) == 1 and not claims.failed(results)
    assert results["sec"].interval.mean == pytest.approx(0.31) and results["sec"].interval.n == 3
    table = claims.format_table(claims.CLAIMS["R5"], results)
    assert "| sec | final_accuracy (max) | 0.3100 | [0.2852, 0.3348] | 3 | 12 | ok |" in table
    assert "| sec - uniform | 0.1000 | [0.1000, 0.1000] | 3 | better at 95% |" in table
    assert "| sec - hard_to_easy | 0.0000 | [0.0000, 0.0000] | 3 | no difference at 95% |" in table


def test_a_failed_run_marks_its_arms_and_the_script_exits_non_zero(tmp_path, monkeypatch):
    run = load_run_script()
    runner, _ = crafted_runner(fail=True)
    monkeypatch.setattr(run, "run_one", runner)
    logged = []
    monkeypatch.setattr(run, "log_summary", lambda *args: logged.append(args))
    results_file = tmp_path / "RESULTS.md"
    assert run.main(["R5", "--seeds", "3", "--results", str(results_file)]) == 1
    text = results_file.read_text()
    assert "FAILED: failed trials: 00001 (boom)" in text and "## R5 --" in text and "CPUs, total wall" in text
    assert len(logged) == 1 and logged[0][3]["claim"] == "R5"


def test_quick_runs_are_not_recorded_unless_asked(tmp_path, monkeypatch):
    run = load_run_script()
    monkeypatch.setattr(run, "run_one", crafted_runner()[0])
    monkeypatch.setattr(run, "log_summary", lambda *args: None)
    monkeypatch.setattr(run, "RESULTS", tmp_path / "RESULTS.md")
    assert run.main(["R5", "--quick", "--seeds", "3"]) == 0
    assert not (tmp_path / "RESULTS.md").exists()


def test_r3_returns_arms_share_one_eval_run_whose_seed_count_is_overridden():
    r3 = claims.CLAIMS["R3"]
    (key,) = claims.planned_runs(r3)
    assert key.file == "R3_lpo_eval.yaml" and key.overrides[-1] == "lpo_eval.seeds=8"
    assert [step.overrides for step in r3.prepare] == [("lpo.drift=lpo",), ("lpo.drift=ta_lpo",)]


def test_returns_reduce_keys_each_eval_return_by_its_seed_index():
    arm = claims.Arm("lpo", "e.yaml", "returns", {"objective": "mlflow:abc"}, reduce="returns", seed_field="x.seeds")
    rows = [
        {"objective": "ppo", "problem": "CartPole-v1_50000", "returns": [1.0, 2.0]},
        {"objective": "mlflow:abc", "problem": "CartPole-v1_50000", "returns": [3.0, None]},
    ]
    assert claims.arm_runs(arm, (0, 1, 2))[0][1].overrides == ("x.seeds=3",)
    values = claims.per_seed_values(arm, [(None, rows)])
    assert values[0] == 3.0 and math.isnan(values[1]) and set(values) == {0, 1}


META_SEED = "lpo.meta_seeds="


def lpo_runner(fail_prepare: bool = False, fail_at: int | None = None):
    """Crafted runs of R3: each meta-training gets a run id (``run-<drift>``, ``run-<drift>-<k>`` for meta-seed
    k); the eval rows, for the drifts its objectives override names, give lpo = ppo + k and ta_lpo = lpo + 1 + k
    over eval seeds s (ppo: 100 + s). ``fail_at``: the meta-seed whose meta-trainings fail."""
    calls = []

    def runner(key):
        calls.append(key)
        if key.file == "R3_lpo_meta.yaml":
            drift = key.overrides[0].split("=")[1]
            seeds = [o.removeprefix(META_SEED) for o in key.overrides if o.startswith(META_SEED)]
            k = int(seeds[0].strip("[]")) if seeds else None
            row = {
                "meta_seed": 0 if k is None else k,
                "generations": 3,
                "fitness_mean": 1.02,
                "curves": {"mean_score": ([0, 2], [1.0, 1.1])},
            }
            fail = fail_prepare or (fail_at is not None and k == fail_at)
            return claims.RunOutcome(
                [row], 5.0, "boom" if fail else None, f"run-{drift}" + ("" if k is None else f"-{k}")
            )
        (objectives,) = [o for o in key.overrides if o.startswith("lpo_eval.objectives=")]
        names = [n.strip().strip('"') for n in objectives.split("=", 1)[1].strip("[]").split(",")]
        rows = []
        for name in names:
            drift, _, k = name.removeprefix("mlflow:run-").partition("-")
            k = int(k or 0)
            bonus = {"ppo": 0.0, "lpo": k, "ta_lpo": 2.0 * k + 1.0}[drift]
            rows += [
                {"objective": name, "problem": f"CartPole-v1_{steps}", "returns": [100.0 + bonus + s for s in range(8)]}
                for steps in (25000, 50000, 100000)
            ]
        return claims.RunOutcome(rows, 7.0, None, "run-eval")

    return runner, calls


def test_a_two_stage_claim_prepares_first_and_names_the_prepared_runs_in_the_arms():
    run = load_run_script()
    runner, calls = lpo_runner()
    prepared, results = run.measure_prepared(claims.CLAIMS["R3"], None, False, runner)
    assert [c.file for c in calls] == ["R3_lpo_meta.yaml", "R3_lpo_meta.yaml", "R3_lpo_eval.yaml"]
    assert 'lpo_eval.objectives=[ppo, "mlflow:run-lpo", "mlflow:run-ta_lpo"]' in calls[2].overrides
    assert results["ta_lpo_x2"].arm.select["objective"] == "mlflow:run-ta_lpo" and results["lpo_x1"].interval.n == 8
    verdicts = [line[3] for line in claims.comparison_lines(claims.CLAIMS["R3"], results)]
    assert verdicts == ["no difference", "better", "better"]
    lines = claims.prepare_lines(prepared)
    assert "run run-ta_lpo" in lines and "last population fitness 1.020" in lines and "g2: 1.100" in lines


def test_a_failed_prepare_step_fails_every_arm_without_running_them():
    run = load_run_script()
    runner, calls = lpo_runner(fail_prepare=True)
    _, results = run.measure_prepared(claims.CLAIMS["R3"], None, False, runner)
    assert [c.file for c in calls] == ["R3_lpo_meta.yaml", "R3_lpo_meta.yaml"]
    assert claims.failed(results) and results["ppo_x1"].errors == ("prepare failed: lpo, ta_lpo",)


def test_every_prepare_file_validates_with_its_overrides_and_quick_ones():
    for claim in claims.CLAIMS.values():
        for step in claim.prepare:
            for quick in (False, True):
                for k in claim.meta_seeds or (None,):
                    key = claims.prepare_key(step, quick, k)
                    exp = metaopt.api.load(REPRODUCE / key.file, overrides=key.overrides)
                    assert exp.section.drift == step.label  # R3: the drift it meta-trains is the label the arms name
                    if k is not None:
                        assert exp.section.meta_seeds == [k]


def test_r3_meta_is_r3_with_three_meta_seeds():
    r3, meta = claims.CLAIMS["R3"], claims.CLAIMS["R3-meta"]
    assert meta.meta_seeds == (0, 1, 2) and not r3.meta_seeds
    assert meta.arms == r3.arms and meta.prepare == r3.prepare and meta.comparisons == r3.comparisons
    assert all(step.seed_field == "lpo.meta_seeds" for step in meta.prepare)
    assert claims.claim_meta_seeds(meta, 4) == (0, 1, 2, 3) and claims.claim_meta_seeds(r3) == ()


def test_a_meta_seed_claim_runs_both_stages_per_meta_seed_and_its_interval_runs_over_them():
    run = load_run_script()
    runner, calls = lpo_runner()
    meta = claims.CLAIMS["R3-meta"]
    prepared, results = run.measure_meta(meta, None, meta.meta_seeds, False, runner)
    assert [c.file for c in calls] == ["R3_lpo_meta.yaml", "R3_lpo_meta.yaml", "R3_lpo_eval.yaml"] * 3
    for k in (0, 1, 2):
        lpo, ta_lpo, evaluate = calls[3 * k : 3 * k + 3]
        assert lpo.overrides == ("lpo.drift=lpo", f"lpo.meta_seeds=[{k}]")
        assert ta_lpo.overrides == ("lpo.drift=ta_lpo", f"lpo.meta_seeds=[{k}]")
        assert f'lpo_eval.objectives=[ppo, "mlflow:run-lpo-{k}", "mlflow:run-ta_lpo-{k}"]' in evaluate.overrides
        assert f"lpo_eval.seed={1000 * k}" in evaluate.overrides  # each replicate has its own eval seeds
    # each meta-seed's value is the arm's mean over the 8 eval seeds (100 + bonus + 3.5)
    assert results["ppo_x1"].values == {0: 103.5, 1: 103.5, 2: 103.5}
    assert results["lpo_x1"].values == {0: 103.5, 1: 104.5, 2: 105.5}
    assert results["ta_lpo_x2"].values == {0: 104.5, 1: 106.5, 2: 108.5}
    assert results["lpo_x1"].interval.n == 3 and results["lpo_x1"].interval.mean == pytest.approx(104.5)
    assert results["ppo_x1"].wall_s == 21.0 and not claims.failed(results)
    assert results["lpo_x1"].arm.select["objective"] == "mlflow:{lpo}"  # the claim's arm, not one k's
    differences = {(a, b): d for a, b, d, _ in claims.comparison_lines(meta, results)}
    assert differences[("lpo_x1", "ppo_x1")].n == 3 and differences[("lpo_x1", "ppo_x1")].mean == pytest.approx(1.0)
    assert differences[("ta_lpo_x2", "lpo_x2")].mean == pytest.approx(2.0)  # 1 + k paired by k
    assert list(prepared) == [0, 1, 2]
    lines = claims.prepare_lines(prepared[1], meta_seed=1)
    assert "(R3_lpo_meta.yaml lpo.drift=ta_lpo lpo.meta_seeds=[1]): run run-ta_lpo-1" in lines
    assert "meta-seed 1: 3 generations" in lines


def test_a_failed_prepare_at_one_meta_seed_fails_every_arm_naming_it():
    run = load_run_script()
    runner, calls = lpo_runner(fail_at=1)
    meta = claims.CLAIMS["R3-meta"]
    _, results = run.measure_meta(meta, None, meta.meta_seeds, False, runner)
    meta_files, eval_files = ["R3_lpo_meta.yaml"] * 2, ["R3_lpo_eval.yaml"]
    assert [c.file for c in calls] == meta_files + eval_files + meta_files + meta_files + eval_files  # no eval at k=1
    assert claims.failed(results)
    assert all(r.errors == ("prepare failed at meta-seed 1: lpo, ta_lpo",) for r in results.values())
    assert set(results["lpo_x1"].values) == {0, 1, 2} and math.isnan(results["lpo_x1"].values[1])
    assert results["lpo_x1"].interval.n == 2  # the meta-seeds that ran


def test_meta_seeds_option_is_parsed_and_refused_on_a_claim_without_meta_seeds(capsys):
    run = load_run_script()
    for argv, message in (
        (["R1", "--meta-seeds", "3"], "--meta-seeds needs a claim with meta-seeds; R1 has none"),
        (["R3-meta", "--meta-seeds", "1"], "--meta-seeds must be >= 2"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_r3_meta_quick_with_two_meta_seeds_prints_the_meta_seed_table(tmp_path, monkeypatch, capsys):
    run = load_run_script()
    runner, calls = lpo_runner()
    monkeypatch.setattr(run, "run_one", runner)
    logged = []
    monkeypatch.setattr(run, "log_summary", lambda *args: logged.append(args))
    results_file = tmp_path / "RESULTS.md"
    assert run.main(["R3-meta", "--quick", "--meta-seeds", "2", "--results", str(results_file)]) == 0
    assert len(calls) == 6 and [c.overrides[-1] for c in calls if c.file == "R3_lpo_meta.yaml"] == [
        "lpo.meta_seeds=[0]",
        "lpo.meta_seeds=[0]",
        "lpo.meta_seeds=[1]",
        "lpo.meta_seeds=[1]",
    ]
    assert all("lpo.es.generations=1" in c.overrides for c in calls if c.file == "R3_lpo_meta.yaml")
    text = results_file.read_text()
    assert "| lpo_x1 | returns (max) | 104.0000 | " in text and "| 2 | 14 | ok |" in text
    assert "seeds = meta-training seeds (0, 1); each value is the mean over 8 evaluation seeds" in text
    assert "lpo.eval_seeds=2 lpo.meta_seeds=[1]): run run-lpo-1" in text  # what ran, quick overrides included
    assert logged[0][3]["meta_seeds"] == "[0, 1]" and "R3-meta" in capsys.readouterr().out


@pytest.mark.parametrize("claim_id", ["R1", "R1b"])
def test_r1_arms_are_one_sweep_per_seed_at_equal_budget_differing_only_in_the_lr_rule(claim_id):
    """Jaderberg et al. 2017 compare PBT with tuned fixed/cosine lrs at the same compute: same file, population,
    iterations and steps; only scheduler / lr_schedule differ; ranked on the sweep's best trial."""
    claim = claims.CLAIMS[claim_id]
    sections = {}
    for arm in claim.arms:
        assert arm.reduce == "best" and arm.seed_field == "pbt.seed" and arm.metric == "final_metric"
        sections[arm.label] = metaopt.api.load(REPRODUCE / arm.file, overrides=arm.overrides).section
    budget = {(s.population, s.iterations, s.steps_per_iteration, s.lr_min, s.lr_max) for s in sections.values()}
    assert len(budget) == 1
    assert [(s.scheduler, s.lr_schedule) for s in sections.values()] == [
        ("pbt", "constant"),
        ("grid", "constant"),
        ("grid", "cosine"),
    ]
    assert len(claims.planned_runs(claim)) == 3 * 5


def test_a_row_metric_may_be_a_dotted_path_into_a_search_row():
    # A symbolic search row carries its funnel in ``final``: the best program's meta-validation score and AdamW's
    # (the start program's) are read by path; a failed search (final None) gives NaN, a plain key wins.
    stage = {"stage": "meta_validation", "score": 0.61, "start_score": 0.58}
    row = {"seed": 3, "final": {"funnel": [{"stages": [{"stage": "funnel_0"}, stage]}]}, "a.b": 7.0}
    assert claims.row_value(row, "final.funnel.0.stages.-1.score") == 0.61
    assert claims.row_value(row, "a.b") == 7.0
    assert claims.row_value(row, "final.funnel.5.stages") is None
    arm = claims.Arm("best", "f.yaml", "final.funnel.0.stages.-1.start_score", seed_field="symbolic.seeds")
    failed = {"seed": 4, "final": None}
    values = claims.per_seed_values(arm, [(None, [row, failed])])
    assert values[3] == 0.58 and math.isnan(values[4])


def test_every_arm_label_is_a_valid_mlflow_metric_name_prefix():
    import re

    for claim in claims.CLAIMS.values():
        assert all(re.fullmatch(r"[\w\-. :/]+", arm.label) for arm in claim.arms), claim.id  # run.py logs label.mean


def test_a_meta_seed_with_a_missing_eval_seed_is_nan_and_an_error_not_a_mean_over_fewer_seeds():
    run = load_run_script()
    runner, _ = lpo_runner()

    def gappy(key):
        outcome = runner(key)
        if key.file == "R3_lpo_eval.yaml" and "lpo_eval.seed=0" in key.overrides:
            for row in outcome.rows:
                if row["objective"] == "mlflow:run-lpo-0":
                    row["returns"] = [math.nan, math.nan, *row["returns"][2:]]  # its two worst seeds lost
        return outcome

    meta = claims.CLAIMS["R3-meta"]
    _, results = run.measure_meta(meta, None, meta.meta_seeds, False, gappy)
    assert math.isnan(results["lpo_x1"].values[0]) and results["lpo_x1"].values[1] == 104.5
    assert results["lpo_x1"].errors == ("meta-seed 0: 6/8 evaluation seeds finite",) and claims.failed(results)
    assert results["ppo_x1"].errors == () and results["ppo_x1"].interval.n == 3


def test_a_config_error_after_the_first_meta_seed_keeps_the_measured_ones():
    from metaopt.errors import ConfigError

    run = load_run_script()
    runner, _ = lpo_runner()

    def refusing_at(k):
        def refuse(key):
            if key.file == "R3_lpo_eval.yaml" and f"lpo_eval.seed={1000 * k}" in key.overrides:
                raise ConfigError("lpo_eval.objectives", f"mlflow:run-lpo-{k} has no drift artifact")
            return runner(key)

        return refuse

    meta = claims.CLAIMS["R3-meta"]
    _, results = run.measure_meta(meta, None, meta.meta_seeds, False, refusing_at(2))
    assert results["lpo_x1"].values[0] == 103.5 and math.isnan(results["lpo_x1"].values[2])
    assert results["lpo_x1"].errors == (
        "meta-seed 2: ConfigError: lpo_eval.objectives: mlflow:run-lpo-2 has no drift artifact",
    )
    with pytest.raises(ConfigError):  # at the first meta-seed it is a bad claim or file: exit 2, nothing lost
        run.measure_meta(meta, None, meta.meta_seeds, False, refusing_at(0))
