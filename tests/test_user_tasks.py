"""Your own training problem (issue 22, item 1): ``task: module:function`` wherever a task is named.

The worked example (examples/own_task) runs as a user runs it, from its own folder; every way a user's factory
can be wrong is one error line on ``pbt.task`` before Ray starts; replay and the symbolic search's proxies build
a user's task like a built-in one.
"""

from __future__ import annotations

import math
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import run_metaopt_from
from metaopt import cli, config, user_code
from metaopt.tasks import CONTRACT_MEMBERS, TrainingTask, build_task, task_metric_mode

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_task"

# A small, complete user task: a linear model on y = 2x, whose factory counts its calls in a file.
LINEAR_TASK = """
import copy
from pathlib import Path

import torch

from metaopt.optim import build_optimizer, set_learning_rate


class LinearTask:
    metric = "fit_error"
    mode = "min"
    divergence_loss = None

    def __init__(self, options, optimizer, seed):
        self.options, self.optimizer_spec = options, optimizer
        torch.manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.optimizer = build_optimizer([self.weight], optimizer)
        self.x = torch.linspace(-1, 1, options.get("points", 16))
        self._step = 0

    @property
    def step(self):
        return self._step

    def train(self, num_steps, lr_at):
        for _ in range(num_steps):
            set_learning_rate(self.optimizer, lr_at(self._step))
            loss = ((self.weight * self.x - 2 * self.x) ** 2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self._step += 1
        error = abs(self.weight.item() - 2.0)
        return {"loss": error**2, "fit_error": error}

    def state(self):
        return {"weight": self.weight.detach().clone(), "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "step": self._step}

    def restore(self, state):
        with torch.no_grad():
            self.weight.copy_(state["weight"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._step = state["step"]


def make_task(options, optimizer, seed):
    calls = Path(__file__).with_name("calls.txt")
    calls.write_text(str(int(calls.read_text()) + 1 if calls.exists() else 1))
    return LinearTask(options, optimizer, seed)
"""


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """The user's folder (the current directory), outside the package; sys.path restored and the user's modules
    (named ``ut_*``) forgotten after, so no test answers from a module an earlier one imported."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv(user_code.USER_DIR_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [name for name in sys.modules if name.startswith("ut_")]:
        del sys.modules[name]


def write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(textwrap.dedent(text))


def pbt_experiment(folder: Path, task: str, **pbt) -> Path:
    raw = {
        "name": "own",
        "kind": "pbt",
        "pbt": {"task": task, "population": 2, "iterations": 2, "perturbation_interval": 1, **pbt},
    }
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------- the worked example, run as a user runs it


def test_the_worked_example_runs_from_its_own_folder(tmp_path):
    """examples/own_task copied outside the repository and run with ``metaopt run`` from there: the sweep scores
    trials by the user's metric, which MLflow holds too."""
    folder = tmp_path / "own_task"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__", "mlruns", "mlflow.db"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        "pbt.population=2",
        "pbt.iterations=2",
        "pbt.steps_per_iteration=20",
        "pbt.perturbation_interval=1",
        "pbt.quantile_fraction=0.5",
        "pbt.lr_min=0.01",
        "pbt.lr_max=0.1",
        "ray.num_cpus=1",
        "ray.worker_preload=[]",
        f"ray.storage_path={tmp_path / 'ray_results'}",
        f"tracking.uri={uri}",
    ]
    result = run_metaopt_from(folder, "pbt.yaml", "--quiet", *[arg for o in overrides for arg in ("--set", o)])
    assert "val_mse" in result.stdout and "BEST" in result.stdout, result.stdout[-2000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("own-task-pbt")
    runs = client.search_runs([experiment.experiment_id])
    best = [run.data.metrics["best_val_mse"] for run in runs if "best_val_mse" in run.data.metrics]
    trial_scores = [run.data.metrics["val_mse"] for run in runs if "val_mse" in run.data.metrics]
    assert len(trial_scores) == 2 and best == [min(trial_scores)]
    assert 0 < best[0] < 2.0  # the MLP learned: untrained, its validation MSE is about 2.2


# ---------------------------------------------------------------- one error line before Ray starts


def run_cli(folder: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    code = cli.main(["run", str(folder / "exp.yaml"), *extra])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "task, problem",
    [
        ("ut_absent_module:make_task", "'ut_absent_module:make_task': no module named 'ut_absent_module'"),
        ("ut_errors:absent", "'ut_errors:absent': ut_errors has no attribute 'absent'"),
        ("ut_errors:two_arguments", "'ut_errors:two_arguments' must accept (options, optimizer, seed)"),
        ("ut_errors:raises", "'ut_errors:raises' raised KeyError: 'rows'"),
        (
            "ut_errors:a_dict",
            "'ut_errors:a_dict' returned a dict; expected an object meeting metaopt.tasks.TrainingTask "
            "(metric, mode, divergence_loss, step, train, state, restore)",
        ),
        ("ut_errors:half_a_task", "returned a HalfTask; expected an object meeting metaopt.tasks.TrainingTask"),
        ("ut_errors:sideways", "'ut_errors:sideways' returned a task whose mode is 'up'; expected min or max"),
        ("ut_errors:no:colon", "'ut_errors:no:colon' is not a 'module:function' reference"),
        ("digitz", "unknown task 'digitz'; allowed: digits, cartpole_rllib, tiny_lm, or your own"),
    ],
)
def test_each_mistake_is_one_line_on_pbt_task(user_folder, capsys, task, problem):
    write(
        user_folder,
        "ut_errors.py",
        """
        def two_arguments(options, optimizer):
            return None
        def raises(options, optimizer, seed):
            return options["rows"]
        def a_dict(options, optimizer, seed):
            return {"metric": "x"}
        class HalfTask:
            metric, mode = "x", "min"
            def train(self, num_steps, lr_at):
                return {}
        def half_a_task(options, optimizer, seed):
            return HalfTask()
        class Sideways(HalfTask):
            mode, divergence_loss, step = "up", None, 0
            def state(self):
                return {}
            def restore(self, state):
                pass
        def sideways(options, optimizer, seed):
            return Sideways()
        """,
    )
    pbt_experiment(user_folder, task)
    code, lines = run_cli(user_folder, capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("metaopt: error: pbt.task: "), lines
    assert problem in lines[0], lines[0]
    if task == "ut_errors:half_a_task":
        assert lines[0].endswith("it lacks divergence_loss, step, state, restore")


def test_a_symbolic_proxy_task_is_checked_the_same_way(user_folder, capsys):
    write(user_folder, "ut_proxy.py", "def make(options, optimizer, seed):\n    return [options, seed]\n")
    raw = {"name": "own", "kind": "symbolic", "symbolic": {"proxy": {"task": "ut_proxy:make"}}}
    (user_folder / "exp.yaml").write_text(yaml.safe_dump(raw))
    code, lines = run_cli(user_folder, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("metaopt: error: symbolic.proxy.task: 'ut_proxy:make' returned a list; expected")


def test_a_task_that_trains_with_its_own_optimizer_is_still_refused_as_a_proxy(user_folder):
    raw = {"name": "own", "kind": "symbolic", "symbolic": {"proxy": {"task": "cartpole_rllib"}}}
    with pytest.raises(config.ConfigError, match=r"trains with its own optimizer.*or your own 'module:function'"):
        config.from_dict(raw, check_paths=False)


def test_an_experiment_that_runs_elsewhere_never_imports_the_users_code(user_folder):
    """``metaopt submit`` / ``list`` validate with check_paths off: the module lives on the cluster's copy."""
    raw = {"name": "own", "kind": "pbt", "pbt": {"task": "ut_not_here:make_task", "task_options": {"rows": 3}}}
    exp = config.from_dict(raw, check_paths=False)
    assert exp.section.task == "ut_not_here:make_task"
    assert exp.to_dict()["pbt"]["task_options"] == {"rows": 3}


# ---------------------------------------------------------------- what the factory gets, probed once


def test_the_factory_gets_a_plain_dict_the_validated_optimizer_and_the_seed_and_is_probed_once(user_folder):
    write(user_folder, "ut_linear.py", LINEAR_TASK)
    options = {"points": 8, "nested": {"a": [1, 2]}}
    path = pbt_experiment(user_folder, "ut_linear:make_task", task_options=options, seed=3)
    exp = config.load(path)
    assert (user_folder / "calls.txt").read_text() == "1"  # the probe, while the section was validated
    assert exp.to_dict()["pbt"]["task_options"] == options  # as given, also in what trials and MLflow receive
    section = exp.section
    assert task_metric_mode(section.task, section.task_options, section.optimizer, section.seed) == (
        "fit_error",
        "min",
    )
    assert (user_folder / "calls.txt").read_text() == "1"  # metric and mode came from that probe
    assert task_metric_mode("digits") == ("val_accuracy", "max")  # a built-in's: its class attributes, unbuilt

    dumped = exp.to_dict()["pbt"]  # what a Tune trial receives
    task = build_task(dumped["task"], dumped["task_options"], dumped["optimizer"], dumped["seed"])
    assert isinstance(task, TrainingTask) and all(hasattr(task, member) for member in CONTRACT_MEMBERS)
    assert type(task.options) is dict and task.options == options
    assert task.optimizer_spec.name == "sgd" and task.optimizer_spec.momentum == 0.9  # the section's default
    before = task.state()
    first = task.train(20, lambda _step: 0.1)
    task.restore(before)
    assert task.train(20, lambda _step: 0.1) == first  # resumable
    assert first["fit_error"] < 1.0  # halved from 2 (the weight starts at 0)


# ---------------------------------------------------------------- replay and symbolic proxies, in process


def test_replay_builds_the_users_task_and_follows_the_schedule(user_folder):
    from metaopt.pbt.replay import replay

    write(user_folder, "ut_linear.py", LINEAR_TASK)
    exp = config.load(pbt_experiment(user_folder, "ut_linear:make_task"))
    payload = {
        "experiment": exp.to_dict(),
        "steps_per_iteration": 10,
        "total_steps": 30,
        "best_trial": "t0",
        "trials": {"t0": {"schedule": [[0, 0.5], [20, 0.05]], "final_metric": 0.0}},
    }
    result = replay(payload, progress=False)
    assert result.metric == "fit_error" and result.steps == 30

    section = exp.to_dict()["pbt"]
    by_hand = build_task(section["task"], section["task_options"], section["optimizer"], section["seed"])
    by_hand.train(20, lambda _step: 0.5)
    expected = by_hand.train(10, lambda _step: 0.05)["fit_error"]
    assert result.replay_metric == pytest.approx(expected, abs=1e-7) and expected < 1.0


def test_a_symbolic_proxy_trains_the_users_task_with_a_program(user_folder):
    from metaopt.symbolic.proxies import score_program, train_once
    from metaopt.symbolic.search import load_start_program, proxy_dict

    write(user_folder, "ut_linear.py", LINEAR_TASK)
    raw = {"name": "own", "kind": "symbolic", "symbolic": {"proxy": {"task": "ut_linear:make_task", "steps": 30}}}
    proxy = proxy_dict(config.from_dict(raw).section.proxy)
    program = load_start_program("adamw").to_json()
    score, failure = train_once(program, proxy, 30.0, seed=0)  # AdamW's program scales lr by 0.001
    assert failure is None and math.isfinite(score) and -2.0 < score < 0  # mode min: the score is -fit_error
    assert score > -1.99  # the weight moved towards 2 under the program
    assert score_program(program, proxy).failure is None


# ---------------------------------------------------------------- the review's findings (relative files, replay)

READS_DATA = """
from ut_linear_base import LinearTask

def make_task(options, optimizer, seed):
    with open("data.csv") as f:  # relative to the folder the user ran metaopt in
        options = {**options, "points": len(f.readlines())}
    return LinearTask(options, optimizer, seed)
"""


def test_a_factory_reading_a_relative_file_works_in_a_trials_own_folder(user_folder, monkeypatch):
    write(user_folder, "ut_linear_base.py", LINEAR_TASK)
    write(user_folder, "ut_reads.py", READS_DATA)
    (user_folder / "data.csv").write_text("1\n2\n3\n4\n5\n")
    trial_folder = user_folder / "ray_results" / "trial_0"
    trial_folder.mkdir(parents=True)
    monkeypatch.setenv(user_code.USER_DIR_VARIABLE, str(user_folder))  # as runtime.init hands it to the workers
    monkeypatch.chdir(trial_folder)  # where Ray runs the trial
    task = build_task("ut_reads:make_task", {}, {"name": "sgd"}, 0)
    assert task.options["points"] == 5 and Path.cwd() == trial_folder


def test_a_trial_or_replay_whose_factory_fails_says_so_in_one_line(user_folder):
    write(user_folder, "ut_bad.py", "def make(options, optimizer, seed):\n    return {'metric': 'x'}\n")
    with pytest.raises(config.ConfigError) as caught:
        build_task("ut_bad:make", {}, {"name": "sgd"}, 0)
    assert str(caught.value).startswith("task: 'ut_bad:make' returned a dict; expected an object meeting")


def test_a_proxy_task_that_cannot_be_built_fails_the_search_instead_of_scoring_minus_inf(user_folder):
    from metaopt.symbolic.proxies import train_once
    from metaopt.symbolic.search import load_start_program

    write(user_folder, "ut_linear_base.py", LINEAR_TASK)
    write(user_folder, "ut_reads.py", READS_DATA)  # no data.csv here
    proxy = {"task": "ut_reads:make_task", "task_options": {}, "steps": 2, "lrs": [1.0], "seeds": 1}
    with pytest.raises(config.ConfigError, match=r"^task: 'ut_reads:make_task' raised FileNotFoundError"):
        train_once(load_start_program("adamw").to_json(), proxy, 1.0, seed=0)


def test_an_edited_module_is_probed_again(user_folder):
    write(user_folder, "ut_linear.py", LINEAR_TASK)
    assert task_metric_mode("ut_linear:make_task") == ("fit_error", "min")
    write(user_folder, "ut_linear.py", LINEAR_TASK.replace('metric = "fit_error"', 'metric = "fit_error_v2"'))
    assert task_metric_mode("ut_linear:make_task") == ("fit_error_v2", "min")


def test_a_trials_error_in_its_init_is_the_users_own_line():
    """Ray wraps an exception raised while a trial's actor is created in an ActorDiedError holding only its text,
    coloured for a terminal: the failed trial's line is the user's error."""
    import traceback

    from ray.exceptions import ActorDiedError, RayTaskError

    from metaopt.session import first_error_line

    for raised, line in [
        (FileNotFoundError(2, "No such file or directory", "data.csv"), "FileNotFoundError: [Errno 2] No such"),
        (config.ConfigError("task", "'t:make' raised KeyError: 'rows'"), "task: 't:make' raised KeyError: 'rows'"),
    ]:
        try:
            raise raised
        except Exception as err:
            task_error = RayTaskError("f", traceback.format_exc(), err, proctitle="\x1b[36mray::Trainable()\x1b[39m")
        assert first_error_line(ActorDiedError(task_error)).startswith(line)
        assert first_error_line(task_error).startswith(line)
    assert first_error_line(ActorDiedError()).startswith("ActorDiedError: The actor died unexpectedly")


def _payload(exp, **extra):
    return {
        "experiment": exp.to_dict(),
        "steps_per_iteration": 5,
        "total_steps": 5,
        "best_trial": "t0",
        "trials": {"t0": {"schedule": [[0, 0.5]], "final_metric": 0.0}},
        **extra,
    }


def test_replay_uses_the_sweeps_directory_and_warns_when_the_code_changed(user_folder, monkeypatch, capsys):
    from metaopt.pbt.replay import replay
    from metaopt.pbt.sweep import user_task_code

    write(user_folder, "ut_linear.py", LINEAR_TASK)
    exp = config.load(pbt_experiment(user_folder, "ut_linear:make_task"))
    code = user_task_code(exp)
    assert code["user_dir"] == str(user_folder) and code["sha256"] == user_code.file_sha256(
        user_folder / "ut_linear.py"
    )

    elsewhere = user_folder / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the module is not here: replay imports from the sweep's directory
    assert replay(_payload(exp, code=code), progress=True).steps == 5
    assert "warning" not in capsys.readouterr().out

    write(user_folder, "ut_linear.py", LINEAR_TASK + "\n# edited after the sweep\n")
    replay(_payload(exp, code=code), progress=True)
    warning = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warning) == 1 and "ut_linear.py is not the code the sweep ran" in warning[0]


def test_replaying_a_sweep_of_a_python_object_points_to_python(user_folder):
    import json

    from metaopt.pbt.replay import load_payload

    write(user_folder, "ut_linear.py", LINEAR_TASK)
    exp = config.load(pbt_experiment(user_folder, "ut_linear:make_task"))
    payload = _payload(exp)
    payload["experiment"]["pbt"]["task"] = user_code.reference_to(lambda options, optimizer, seed: None)
    path = user_folder / "schedules.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(config.ConfigError) as caught:
        load_payload(str(path), None)
    assert str(caught.value) == (
        f"{path}: this sweep's task is an in-memory Python object; replay it from Python "
        f"(metaopt.api.replay({str(path)!r}))"
    )
    assert load_payload(str(path), None, python_objects=True)["experiment"]["pbt"]["task"].startswith("pickle:")
