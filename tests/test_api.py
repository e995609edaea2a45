"""The Python API (metaopt.api): metaopt.run on a file, a dict or a typed Experiment, and a capability run from
Python objects, each becoming a reference (module:qualname, or a pickle: object only this API may name).

A small probe kind (section: a user function and a data file) runs in-process without Ray; two tiny PBT sweeps
run for real on the session's Ray and are checked against the MLflow store.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from pydantic import Field

import metaopt
from conftest import EXPERIMENTS
from metaopt import api, config, registry, user_code
from metaopt.config import StrictModel
from metaopt.errors import ConfigError
from metaopt.registry import Capability

UserFunction = user_code.user_function("x")


class ProbeSection(StrictModel):
    """A user function ``fn(x)`` evaluated at ``x``, and perhaps an .npz data set whose samples are counted."""

    fn: UserFunction = Field(default="math:sqrt")
    x: float = 4.0
    data: str | None = None


def run_probe(exp, *, address=None, verbose=1) -> list[dict]:
    """The probe's runner: one row, printed as a table, as a capability's runner does."""
    section = exp.section
    row = {"trial_id": "probe_00000", "final_value": float(user_code.load(section.fn)(section.x)), "error": None}
    if section.data:
        with np.load(section.data) as arrays:
            row["samples"] = len(arrays["x"])
    print("[metaopt] probing", flush=True)
    print(f"trial        value\n{row['trial_id']}  {row['final_value']:g}", flush=True)
    print("[metaopt] done", flush=True)
    return [row]


PROBE = Capability(kind="apiprobe", section=ProbeSection, runner="test_api:run_probe")


def double(x):
    """A module-level function of a module Ray's workers cannot import by name (not in the user's directory)."""
    return 2 * x


@pytest.fixture
def probe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    registry.register(PROBE)
    yield tmp_path
    registry.unregister(PROBE.kind)


def test_import_metaopt_stays_cheap():
    import subprocess

    code = "import sys, metaopt; metaopt.run; print(sorted({'ray', 'torch', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_objects_become_references(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    offset = 5
    local = lambda x: x + offset  # noqa: E731 - a lambda is exactly what cannot be imported by name
    converted = api.to_references(
        {"fn": local, "named": double, "nested": [{"f": local}, (1.0, np.float32(0.5))], "where": tmp_path}
    )
    # this test module lies neither in the user's directory (tmp_path) nor where packages are installed: Ray's
    # workers could not import it by name, so it travels by value too
    assert converted["named"].startswith(user_code.PICKLE_PREFIX) and user_code.load(converted["named"])(2) == 4
    reference = converted["fn"]
    assert reference.startswith(user_code.PICKLE_PREFIX)
    assert Path(reference.removeprefix(user_code.PICKLE_PREFIX)).parent == tmp_path / ".metaopt" / "objects"
    assert user_code.load(reference)(1) == 6  # by value, with what it closes over
    assert converted["nested"] == [{"f": reference}, [1.0, 0.5]]  # same object, same file; tuples become lists
    assert isinstance(converted["nested"][1][1], float) and converted["where"] == str(tmp_path)


def test_arrays_become_an_npz_with_x_and_y(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = np.arange(12.0).reshape(6, 2), np.arange(6) % 2
    path = api.to_references({"dataset": (x, y)})["dataset"]
    assert path.endswith(".npz") and Path(path).parent == tmp_path / ".metaopt" / "objects"
    with np.load(path) as arrays:
        assert np.array_equal(arrays["x"], x) and np.array_equal(arrays["y"], y)
    assert api.to_references({"x": x, "y": y}) == path  # the same data, the same file
    with pytest.raises(ConfigError, match=r"^federated\.dataset: x and y must have as many samples \(got 6 and 3\)"):
        api.to_references({"federated": {"dataset": (x, y[:3])}})


def test_a_capability_runs_from_python_objects(probe, capsys):
    x, y = np.zeros((7, 3)), np.ones(7)
    result = api.run_kind("apiprobe", fn=lambda value: value * 10, x=3, data=(x, y), verbose=0)
    assert result.rows == [{"trial_id": "probe_00000", "final_value": 30.0, "error": None, "samples": 7}]
    assert result.best == result.rows[0] and result.complete and result.exit_code == 0
    assert result.table == "trial        value\nprobe_00000  30"
    assert "probe_00000  30" in capsys.readouterr().out  # still printed
    assert result.summary == result.rows and result.run_id is None and result.name == "apiprobe-python"


def test_a_typed_experiment_and_a_dict_run(probe, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    (probe / "api_doubling.py").write_text("def double(x):\n    return 2 * x\n")
    in_user_dir = user_code.load("api_doubling:double")  # a module of the user's directory: named
    exp = api.experiment("apiprobe", name="typed", fn=in_user_dir, x=2.5)
    assert isinstance(exp, config.Experiment) and exp.section.fn == "api_doubling:double"
    assert metaopt.run(exp, verbose=0).rows[0]["final_value"] == 5.0
    raw = {"name": "plain", "kind": "apiprobe", "apiprobe": {"fn": double, "x": 1.5}}
    assert metaopt.run(raw, overrides=["apiprobe.x=4"], verbose=0).rows[0]["final_value"] == 8.0
    path = probe / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "file", "kind": "apiprobe", "apiprobe": {"x": 9.0}}))
    assert metaopt.run(str(path), verbose=0).best["final_value"] == 3.0


def test_a_pickle_reference_is_refused_outside_the_python_api(probe):
    reference = user_code.reference_to(lambda x: x)
    raw = {"name": "p", "kind": "apiprobe", "apiprobe": {"fn": reference}}
    with pytest.raises(ConfigError) as caught:
        config.from_dict(raw)  # what an experiment file reaches
    assert str(caught.value) == (
        "apiprobe.fn: a pickle: reference is written by metaopt's Python API; name a 'module:function'"
    )
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"^apiprobe\.fn: a pickle: reference is written by"):
        metaopt.run(raw)  # text handed to the API is not one of its own objects either
    with pytest.raises(ConfigError, match=r"^--set: a pickle: reference"):
        metaopt.run({"name": "p", "kind": "apiprobe"}, overrides=[f"apiprobe.fn={reference}"])
    assert config.from_dict(raw, python_objects=True).section.fn == reference


@pytest.mark.parametrize(
    "experiment, message",
    [
        (42, "experiment: must be a path, a mapping or an Experiment (got int)"),
        ("missing.yaml", "missing.yaml: file not found"),
        ({"name": "bad", "kind": "pbt", "pbt": {"population": 1}}, "pbt.population: Input should be greater than"),
        ({"name": "bad", "kind": "nope"}, "kind: unknown kind 'nope'"),
    ],
)
def test_bad_input_raises_one_line(probe, experiment, message):
    with pytest.raises(ConfigError) as caught:
        metaopt.run(experiment)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_user_code_is_checked_before_anything_runs(probe):
    with pytest.raises(ConfigError, match=r"^apiprobe\.fn: .* must accept \(x\); its signature is \(\)$"):
        api.run_kind("apiprobe", fn=lambda: 1)
    with pytest.raises(ConfigError, match=r"^apiprobe\.x: Input should be a valid number"):
        api.run_kind("apiprobe", fn=double, x="many")


def tiny_pbt(tmp_path: Path) -> dict:
    raw = yaml.safe_load((EXPERIMENTS / "quickstart_tiny.yaml").read_text())
    raw["ray"]["storage_path"] = str(tmp_path / "ray_results")
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    raw["pbt"].update(iterations=2, steps_per_iteration=10, perturbation_interval=1)
    return raw


def assert_runs_finished(result) -> None:
    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert client.get_run(result.run_id).info.experiment_id == (
        client.get_experiment_by_name(result.mlflow_experiment).experiment_id
    )
    assert sorted(result.trial_run_ids) == sorted(row["trial_id"] for row in result.rows)
    for run_id in result.trial_run_ids.values():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == result.run_id


def test_a_dict_with_a_task_factory_defined_in_the_test_runs_and_tracks(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()

    def make_task(options, optimizer, seed):  # not importable by name: travels to Ray's workers pickled
        import os

        from metaopt.tasks.digits import DigitsTask

        options = dict(options)
        Path(options.pop("marks"), f"{seed}-{os.getpid()}").touch()
        return DigitsTask(options, optimizer, seed)

    raw = tiny_pbt(tmp_path)
    raw["pbt"].update(task=make_task, task_options={"hidden": [16], "marks": str(marks)})
    result = metaopt.run(raw, verbose=0)

    assert result.complete and result.status == "FINISHED" and result.failed == []
    assert len(result.rows) == 2 and all(
        row["steps"] == 20 and math.isfinite(row["final_metric"]) for row in result.rows
    )
    assert len(list(marks.iterdir())) >= 3  # the check before Ray started, then each trial in its worker
    assert result.summary.metric == "val_accuracy"
    assert result.best["trial_id"] in result.trial_run_ids and result.best["schedule"]
    assert all(row["trial_id"] in result.table for row in result.rows)
    assert_runs_finished(result)


def test_failed_trials_make_a_result_incomplete(probe, monkeypatch):
    from metaopt import session

    failed = session.SweepOutcome(
        (session.TrialEnd("a", 2, True, None), session.TrialEnd("b", 1, False, "ValueError: boom")),
        iterations=2,
        run_id="parent",
        trial_runs=(("a", "run-a"), ("b", "run-b")),
    )
    ended = [[], [failed]]
    monkeypatch.setattr(session, "ended_sweeps", lambda: ended.pop(0))
    result = api.run_kind("apiprobe", verbose=0)
    assert not result.complete and result.exit_code == 1 and result.status == "FAILED"
    assert result.failed == [("b", "ValueError: boom")]
    assert result.run_id == "parent" and result.trial_run_ids == {"a": "run-a", "b": "run-b"}


@pytest.mark.parametrize(
    "function, kind, section",
    [
        (api.pbt, "pbt", {"population": 3}),
        (api.federated, "federated", {"rounds": 2}),
        (api.learned_objective, "lpo", {"hidden": 8, "envs": [{"env": "CartPole-v1", "total_timesteps": 2048}]}),
        (api.symbolic, "symbolic", {"evaluations": 8}),
        (api.posttrain, "posttrain", {"steps": 5}),
    ],
)
def test_each_capability_function_fills_its_section(tmp_path, monkeypatch, function, kind, section):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(api, "execute", lambda exp, **_: exp)  # what would run, not the run
    exp = function(name="from-python", **section)
    assert exp.kind == kind and exp.name == "from-python"
    first = next(iter(section))
    assert getattr(exp.section, first) == section[first]


def test_a_typed_experiment_from_a_file_validates_again_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = config.load(EXPERIMENTS / "quickstart_tiny.yaml")
    again = metaopt.load(exp, overrides=["pbt.population=3"])
    assert again.section == exp.section.model_copy(update={"population": 3}) and again.source == exp.source


def test_the_best_of_a_program_search_is_the_row_whose_best_program_scored_highest():
    from types import SimpleNamespace

    def search(score):
        return SimpleNamespace(best=lambda: SimpleNamespace(score=score, program_json="[]"))

    rows = [
        {"trial_id": "a", "state": search(0.2), "error": None},
        {"trial_id": "b", "state": search(0.9), "error": None},
        {"trial_id": "c", "state": search(5.0), "error": "RuntimeError: crashed"},  # failed: never the best
        {"trial_id": "d", "state": None, "error": None},
    ]
    assert api.best_of(rows, rows)["trial_id"] == "b"
    assert api.best_of(rows, [rows[3]]) is None
