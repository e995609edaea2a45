"""Experiment files: validation on load, ``--set`` overrides, defaults, round trips, and the CLI's exit code 2.

Every malformed file goes through the real entry point (``metaopt.cli.main(["run", FILE])``) and must give
exactly one stderr line ``metaopt: error: <field>: <problem and what is allowed>``, exit code 2, no stdout,
and must never reach the runner (so no Ray starts here: ``config.runner_for`` is replaced by a tripwire).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from metaopt import config, registry
from metaopt.cli import main
from metaopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_FILES = sorted((REPO / "experiments").glob("*.yaml")) + sorted((REPO / "experiments").glob("*.yml"))


def load_example(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> config.Experiment:
    """An experiment file of the repo; the *_cluster ones name paths on a cluster (/data/...), not here."""
    return config.load(path, overrides, check_paths="cluster" not in path.name)


# A valid, minimal pbt experiment; every malformed case below is one mutation of it.
BASE: dict[str, Any] = {
    "name": "cfg-test",
    "kind": "pbt",
    "description": "config tests",
    "ray": {"cpus_per_trial": 1},
    "tracking": {"uri": "sqlite:///mlflow.db"},
    "pbt": {
        "task": "digits",
        "task_options": {"hidden": [8], "batch_size": 16},
        "optimizer": {"name": "sgd", "momentum": 0.9},
        "population": 2,
        "iterations": 4,
        "steps_per_iteration": 5,
        "perturbation_interval": 2,
        "lr_min": 0.001,
        "lr_max": 0.3,
    },
}

# A valid, minimal lpo (learned-objective meta-training) experiment, for the lpo cases below.
LPO_BASE: dict[str, Any] = {
    "name": "cfg-lpo",
    "kind": "lpo",
    "tracking": {"uri": "sqlite:///mlflow.db"},
    "lpo": {
        "drift": "ta_lpo",
        "envs": [{"env": "CartPole-v1", "total_timesteps": 2048, "ppo": {"num_envs": 4, "num_steps": 64}}],
        "horizons": [0.5, 1.0],
        "es": {"population": 4, "generations": 2},
    },
}
LPO_EVAL_BASE: dict[str, Any] = {
    "name": "cfg-lpo-eval",
    "kind": "lpo_eval",
    "lpo_eval": {"objectives": ["ppo", "dpo"], "envs": [{"env": "Acrobot-v1", "total_timesteps": 4096}]},
}

SYMBOLIC_BASE: dict[str, Any] = {
    "name": "cfg-symbolic",
    "kind": "symbolic",
    "symbolic": {
        "start": "adamw",
        "population": 4,
        "evaluations": 8,
        "batch": 2,
        "proxy": {"task": "digits", "steps": 10},
    },
}

FED_BASE: dict[str, Any] = {
    "name": "cfg-federated",
    "kind": "federated",
    "federated": {"dataset": "digits", "num_clients": 4, "rounds": 2, "strategies": ["fedavg"]},
}

DELETE = object()
DIRECTORY = object()  # file content: make a directory where the file should be
PATH = "{path}"  # stands for the experiment file's path in expected fields/hints


def mutate(_base: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """A deep copy of BASE (or ``_base``) with ``a__b=value`` set (or removed with DELETE)."""
    raw = copy.deepcopy(BASE if _base is None else _base)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def no_ray_started():
    """Nothing in this file may start Ray; checked without importing ray (import alone costs seconds)."""
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not before and ray is not None:
        assert not ray.is_initialized(), "a config test initialised Ray"


@pytest.fixture
def tripwire(monkeypatch):
    """Fail loudly if ``metaopt run`` gets past validation to the runner (which would start Ray)."""

    def runner_for(kind):
        raise AssertionError(f"validation accepted the file: metaopt run would now start the {kind!r} runner")

    monkeypatch.setattr(config, "runner_for", runner_for)


def write_case(tmp_path: Path, content: Any) -> Path:
    """dict -> YAML file; str -> the text as is; bytes -> raw bytes; DIRECTORY -> a directory; None -> nothing."""
    path = tmp_path / "experiment.yaml"
    if content is DIRECTORY:
        path.mkdir()
    elif isinstance(content, dict):
        path.write_text(yaml.safe_dump(content, sort_keys=False))
    elif isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc: int, out: str, err: str, field: str, hints: tuple[str, ...]) -> str:
    assert rc == 2, f"exit code {rc}, stderr {err!r}"
    assert out == "", f"stdout must stay empty, got {out!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}: {err!r}"
    line = lines[0]
    assert err == line + "\n"
    assert line.startswith(f"metaopt: error: {field}: "), f"field {field!r} not named first in {line!r}"
    for hint in hints:
        assert hint in line, f"{hint!r} missing from {line!r}"
    return line


# ---------------------------------------------------------------------------------------- malformed experiments
#
# (id, file content, --set overrides, field named first, hints that must appear in the line)

MALFORMED = [
    # unknown keys
    (
        "unknown-top-level-key",
        mutate(seed=1),
        [],
        "seed",
        ("unknown key", "allowed at top level", "name, kind, description, ray, tracking, pbt"),
    ),
    ("unknown-ray-key", mutate(ray__cpu=1), [], "ray.cpu", ("unknown key", "allowed:", "cpus_per_trial")),
    ("unknown-tracking-key", mutate(tracking__url="http://x"), [], "tracking.url", ("unknown key", "allowed:", "uri")),
    ("unknown-pbt-key", mutate(pbt__populaton=3), [], "pbt.populaton", ("unknown key", "allowed:", "population")),
    ("non-string-top-level-key", {**BASE, 7: "x"}, [], "7", ("unknown key", "allowed at top level")),
    # wrong types
    ("string-for-int", mutate(pbt__population="eight"), [], "pbt.population", ("valid integer", "'eight'")),
    ("fraction-for-int", mutate(pbt__population=4.5), [], "pbt.population", ("valid integer", "4.5")),
    ("string-for-float", mutate(ray__cpus_per_trial="one"), [], "ray.cpus_per_trial", ("valid number", "'one'")),
    ("list-for-ray-mapping", mutate(ray=[1, 2]), [], "ray", ("must be a mapping", "list")),
    ("string-for-tracking-mapping", mutate(tracking="sqlite:///x.db"), [], "tracking", ("must be a mapping", "str")),
    ("list-for-pbt-section", mutate(pbt=["population", 4]), [], "pbt", ("must be a mapping", "list")),
    ("list-for-task-options", mutate(pbt__task_options=[32]), [], "pbt.task_options", ("must be a mapping", "list")),
    (
        "string-for-int-task-option",
        mutate(pbt__task_options={"batch_size": "8"}),
        [],
        "pbt.task_options.batch_size",
        ("valid integer", "'8'"),
    ),
    (
        "float-for-seed-task-option",
        mutate(pbt__task_options={"split_seed": 3.0}),
        [],
        "pbt.task_options.split_seed",
        ("valid integer", "3.0"),
    ),
    (
        "string-for-float-task-option",
        mutate(pbt__task_options={"val_fraction": "0.1"}),
        [],
        "pbt.task_options.val_fraction",
        ("valid number", "'0.1'"),
    ),
    (
        "betas-not-a-pair",
        mutate(pbt__optimizer={"name": "adamw", "betas": [0.9]}),
        [],
        "pbt.optimizer.betas",
        ("must be a pair [beta1, beta2], each in [0, 1)", "[0.9]"),
    ),
    ("mapping-for-string", mutate(tracking__experiment={"a": 1}), [], "tracking.experiment", ("valid string",)),
    ("mapping-for-description", mutate(description={"a": 1}), [], "description", ("must be a string", "dict")),
    ("int-for-uri", mutate(tracking__uri=5), [], "tracking.uri", ("valid string", "5")),
    (
        "perturbation-factors-not-a-list",
        mutate(pbt__perturbation_factors="up"),
        [],
        "pbt.perturbation_factors",
        ("pair", "'up'"),
    ),
    # out of range
    ("population-1", mutate(pbt__population=1), [], "pbt.population", ("greater than or equal to 2", "(got 1)")),
    ("population-too-big", mutate(pbt__population=5000), [], "pbt.population", ("less than or equal to 4096",)),
    ("iterations-0", mutate(pbt__iterations=0), [], "pbt.iterations", ("greater than or equal to 1",)),
    (
        "quantile-fraction-0.9",
        mutate(pbt__quantile_fraction=0.9),
        [],
        "pbt.quantile_fraction",
        ("less than or equal to 0.5", "0.9"),
    ),
    ("negative-lr-min", mutate(pbt__lr_min=-0.1), [], "pbt.lr_min", ("greater than 0", "-0.1")),
    (
        "lr-min-not-below-lr-max",
        mutate(pbt__lr_min=0.5, pbt__lr_max=0.1),
        [],
        "pbt.lr_min",
        ("smaller than lr_max", "lr_min 0.5, lr_max 0.1"),
    ),
    (
        "perturbation-interval-over-iterations",
        mutate(pbt__perturbation_interval=5),
        [],
        "pbt.perturbation_interval",
        ("<= iterations", "5 > 4"),
    ),
    (
        "resample-probability-1.5",
        mutate(pbt__resample_probability=1.5),
        [],
        "pbt.resample_probability",
        ("less than or equal to 1", "1.5"),
    ),
    (
        "negative-perturbation-factor",
        mutate(pbt__perturbation_factors=[1.2, -0.8]),
        [],
        "pbt.perturbation_factors",
        ("perturbation_factors", "> 0"),
    ),
    ("cpus-per-trial-0", mutate(ray__cpus_per_trial=0), [], "ray.cpus_per_trial", ("greater than 0", "(got 0)")),
    (
        "gpus-per-trial-negative",
        mutate(ray__gpus_per_trial=-1),
        [],
        "ray.gpus_per_trial",
        ("greater than or equal to 0",),
    ),
    ("num-cpus-0", mutate(ray__num_cpus=0), [], "ray.num_cpus", ("greater than or equal to 1",)),
    (
        "max-concurrent-trials-0",
        mutate(ray__max_concurrent_trials=0),
        [],
        "ray.max_concurrent_trials",
        ("greater than or equal to 1",),
    ),
    ("worker-niceness-20", mutate(ray__worker_niceness=20), [], "ray.worker_niceness", ("less than or equal to 19",)),
    (
        "worker-preload-not-a-module",
        mutate(ray__worker_preload=["torch", "my-lib"]),
        [],
        "ray.worker_preload",
        ("Python module names", "'my-lib'"),
    ),
    ("worker-preload-a-string", mutate(ray__worker_preload="torch"), [], "ray.worker_preload", ("valid list",)),
    # kind and name
    (
        "unknown-kind",
        mutate(kind="evolution"),
        [],
        "kind",
        ("unknown kind 'evolution'", "allowed: federated, lpo, lpo_eval, pbt"),
    ),
    ("missing-kind", mutate(kind=DELETE), [], "kind", ("missing", "allowed: federated, lpo, lpo_eval, pbt")),
    ("missing-name", mutate(name=DELETE), [], "name", ("missing", "letters, digits, _ . -")),
    ("bad-name-characters", mutate(name="my sweep!"), [], "name", ("letters, digits, _ . -", "'my sweep!'")),
    ("name-with-slash", mutate(name="a/b"), [], "name", ("letters, digits, _ . -",)),
    ("empty-name", mutate(name=""), [], "name", ("letters, digits, _ . -",)),
    ("name-not-a-string", mutate(name=123), [], "name", ("must be a string", "123")),
    # tracking URI, scheduler, task
    (
        "uri-bare-filename",
        mutate(tracking__uri="mlflow.db"),
        [],
        "tracking.uri",
        ("sqlite:///PATH", "http(s)://HOST:PORT", "'mlflow.db'"),
    ),
    ("uri-unknown-scheme", mutate(tracking__uri="ftp://host/mlruns"), [], "tracking.uri", ("sqlite:///PATH",)),
    (
        "unknown-scheduler",
        mutate(pbt__scheduler="hyperband"),
        [],
        "pbt.scheduler",
        ("'pbt', 'pb2', 'random' or 'grid'", "'hyperband'"),
    ),
    (
        "unknown-task",
        mutate(pbt__task="mnist"),
        [],
        "pbt.task",
        ("unknown task 'mnist'", "allowed: digits, cartpole_rllib, tiny_lm"),
    ),
    # optimizer spec (checked with metaopt.optim's own validator)
    (
        "unknown-optimizer",
        mutate(pbt__optimizer={"name": "adam"}),
        [],
        "pbt.optimizer.name",
        ("sgd, adamw, lion", "'adam'"),
    ),
    (
        "optimizer-without-name",
        mutate(pbt__optimizer={"momentum": 0.9}),
        [],
        "pbt.optimizer.name",
        ("sgd, adamw, lion", "missing"),
    ),
    (
        "optimizer-momentum-1.5",
        mutate(pbt__optimizer={"name": "sgd", "momentum": 1.5}),
        [],
        "pbt.optimizer.momentum",
        ("less than 1", "1.5"),
    ),
    (
        "optimizer-key-of-another-optimizer",
        mutate(pbt__optimizer={"name": "sgd", "betas": [0.9, 0.99]}),
        [],
        "pbt.optimizer.betas",
        ("unknown key", "allowed:", "momentum"),
    ),
    (
        "optimizer-nesterov-without-momentum",
        mutate(pbt__optimizer={"name": "sgd", "momentum": 0, "nesterov": True}),
        [],
        "pbt.optimizer.nesterov",
        ("momentum",),
    ),
    (
        "optimizer-bool-lr",
        mutate(pbt__optimizer={"name": "adamw", "lr": True}),
        [],
        "pbt.optimizer.lr",
        ("must be a number, not true",),
    ),
    # digits task options (checked with metaopt.tasks.options.DigitsOptions)
    (
        "digits-unknown-option",
        mutate(pbt__task_options={"layers": [32]}),
        [],
        "pbt.task_options.layers",
        ("unknown key", "allowed:", "hidden"),
    ),
    (
        "digits-hidden-zero",
        mutate(pbt__task_options={"hidden": [0]}),
        [],
        "pbt.task_options.hidden",
        ("positive layer widths", "[0]"),
    ),
    (
        "digits-hidden-string",
        mutate(pbt__task_options={"hidden": "wide"}),
        [],
        "pbt.task_options.hidden",
        ("positive layer widths",),
    ),
    (
        "digits-batch-size-0",
        mutate(pbt__task_options={"batch_size": 0}),
        [],
        "pbt.task_options.batch_size",
        ("greater than or equal to 1", "0"),
    ),
    (
        "digits-val-fraction-0.7",
        mutate(pbt__task_options={"val_fraction": 0.7}),
        [],
        "pbt.task_options.val_fraction",
        ("less than 0.5", "0.7"),
    ),
    # lpo: learned-objective meta-training (objectives/config.py; PPO overrides checked by PPOSettings/PPOConfig)
    (
        "lpo-unknown-env",
        mutate(LPO_BASE, lpo__envs=[{"env": "Pong-v5", "total_timesteps": 100}]),
        [],
        "lpo.envs.0.env",
        ("unknown env 'Pong-v5'", "did you mean Pong-misc", "gymnax.registered_envs"),
    ),
    ("lpo-unknown-drift", mutate(LPO_BASE, lpo__drift="lion"), [], "lpo.drift", ("'lpo' or 'ta_lpo'", "'lion'")),
    (
        "lpo-odd-antithetic-population",
        mutate(LPO_BASE, lpo__es={"population": 5}),
        [],
        "lpo.es.population",
        ("even with antithetic sampling", "5"),
    ),
    (
        "lpo-sigma-min-over-init",
        mutate(LPO_BASE, lpo__es={"sigma_init": 0.01, "sigma_min": 0.1}),
        [],
        "lpo.es.sigma_min",
        ("<= sigma_init",),
    ),
    ("lpo-no-envs", mutate(LPO_BASE, lpo__envs=[]), [], "lpo.envs", ("at least 1 item",)),
    (
        "lpo-env-without-budget",
        mutate(LPO_BASE, lpo__envs=[{"env": "CartPole-v1"}]),
        [],
        "lpo.envs.0.total_timesteps",
        ("Field required",),
    ),
    (
        "lpo-unknown-ppo-field",
        mutate(LPO_BASE, lpo__envs=[{"env": "CartPole-v1", "total_timesteps": 2048, "ppo": {"learning_rate": 0.1}}]),
        [],
        "lpo.envs.0.ppo.learning_rate",
        ("unknown key", "allowed:", "num_envs"),
    ),
    (
        "lpo-minibatches-do-not-divide",
        mutate(
            LPO_BASE,
            lpo__envs=[
                {
                    "env": "CartPole-v1",
                    "total_timesteps": 2048,
                    "ppo": {"num_envs": 3, "num_steps": 5, "num_minibatches": 4},
                }
            ],
        ),
        [],
        "lpo.envs.0.ppo.num_minibatches",
        ("must divide", "= 15, got 4"),
    ),
    (
        "lpo-budget-below-one-update",
        mutate(LPO_BASE, lpo__envs=[{"env": "CartPole-v1", "total_timesteps": 100}]),
        [],
        "lpo.envs.0.total_timesteps",
        ("one update", "got 100"),
    ),
    (
        "lpo-several-horizons-without-time",
        mutate(LPO_BASE, lpo__drift="lpo"),
        [],
        "lpo.horizons",
        ("only matter for ta_lpo",),
    ),
    ("lpo-zero-horizon", mutate(LPO_BASE, lpo__horizons=[0.0, 1.0]), [], "lpo.horizons", ("must be > 0",)),
    ("lpo-workers-do-not-divide", mutate(LPO_BASE, lpo__workers=3), [], "lpo.workers", ("must divide es.population",)),
    ("lpo-duplicate-meta-seeds", mutate(LPO_BASE, lpo__meta_seeds=[1, 1]), [], "lpo.meta_seeds", ("distinct",)),
    (
        "lpo-horizon-shorter-than-one-update",
        mutate(LPO_BASE, lpo__horizons=[0.1, 1.0]),
        [],
        "lpo.envs.0.total_timesteps",
        ("one update", "horizon 0.1"),
    ),
    (
        "lpo-eval-unknown-objective",
        mutate(LPO_EVAL_BASE, lpo_eval__objectives=["ppo", "nowhere/drift"]),
        [],
        "lpo_eval.objectives",
        ("'nowhere/drift'", "ppo, dpo, mlflow:RUN_ID"),
    ),
    (
        "lpo-eval-one-seed",
        mutate(LPO_EVAL_BASE, lpo_eval__seeds=1),
        [],
        "lpo_eval.seeds",
        ("greater than or equal to 2",),
    ),
    (
        "lpo-eval-progress-outside-0-1",
        mutate(LPO_EVAL_BASE, lpo_eval__heatmap_progress=[0.5, 1.5]),
        [],
        "lpo_eval.heatmap_progress",
        ("[0, 1]",),
    ),
    # symbolic: optimizer-program search (symbolic/config.py; start programs through the program parser)
    (
        "symbolic-unknown-proxy-task",
        mutate(SYMBOLIC_BASE, symbolic__proxy={"task": "cifar"}),
        [],
        "symbolic.proxy.task",
        ("unknown task 'cifar'", "allowed: digits, tiny_lm"),
    ),
    (
        "symbolic-tournament-over-population",
        mutate(SYMBOLIC_BASE, symbolic__tournament=5),
        [],
        "symbolic.tournament",
        ("must be <= population",),
    ),
    (
        "symbolic-batch-not-multiple-of-workers",
        mutate(SYMBOLIC_BASE, symbolic__workers=3),
        [],
        "symbolic.batch",
        ("multiple of workers",),
    ),
    (
        "symbolic-start-file-missing",
        mutate(SYMBOLIC_BASE, symbolic__start="no/such/program.txt"),
        [],
        "symbolic.start",
        ("not adamw, lion, program text, or an existing file",),
    ),
    (
        "symbolic-start-program-bad-line",
        mutate(
            SYMBOLIC_BASE,
            symbolic__start=(
                "def train(w, g, m, v, lr):\n"
                "    m = interp(g, m, 0.9)\n"
                "    update = frobnicate(m)\n"
                "    return update, m, v\n"
            ),
        ),
        [],
        "symbolic.start",
        ("line 3", "frobnicate"),
    ),
    (
        "symbolic-tiny-lm-bad-option",
        mutate(SYMBOLIC_BASE, symbolic__meta_validation={"task": "tiny_lm", "task_options": {"heads": 3}}),
        [],
        "symbolic.meta_validation.task_options.heads",
        ("must divide d_model",),
    ),
    (
        "symbolic-program-optimizer-bad-program",
        mutate(pbt__optimizer={"name": "program", "program": "sgd"}),
        [],
        "pbt.optimizer.program",
        ("'sgd' is not adamw, lion, program text, or an existing file", "relative paths are read from"),
    ),
    # federated (federated/config.py)
    ("federated-alpha-0", mutate(FED_BASE, federated__alpha=0), [], "federated.alpha", ("must be > 0",)),
    ("federated-fraction-over-1", mutate(FED_BASE, federated__fraction=1.5), [], "federated.fraction", ("(0, 1]",)),
    ("federated-fraction-0", mutate(FED_BASE, federated__fraction=0), [], "federated.fraction", ("(0, 1]",)),
    (
        "federated-unknown-strategy",
        mutate(FED_BASE, federated__strategies=["fedavg", "fedprox"]),
        [],
        "federated.strategies",
        ("unknown strategy 'fedprox'", "fedhyper_g"),
    ),
    (
        "federated-more-clients-than-samples",
        mutate(FED_BASE, federated__num_clients=1000),
        [],
        "federated.num_clients",
        ("need at least 2000 samples", "digits has 1797"),
    ),
    (
        "federated-cifar-without-root",
        mutate(FED_BASE, federated__dataset="cifar10"),
        [],
        "federated.data_root",
        ("local directory",),
    ),
    # the file itself
    ("bad-yaml-unclosed-list", "name: t\nkind: pbt\npbt:\n  population: [2\n", [], PATH, ("invalid YAML", "line 5")),
    ("bad-yaml-indentation", "name: t\nkind: pbt\n  population: 2\n", [], PATH, ("invalid YAML", "line 3, column")),
    ("bad-yaml-tab", "name: t\n\tkind: pbt\n", [], PATH, ("invalid YAML", "line 2", "'\\t'")),
    ("bad-yaml-undefined-alias", "name: t\nkind: *pbt\n", [], PATH, ("invalid YAML", "line 2", "alias")),
    ("bad-yaml-unhashable-key", "name: t\nkind: pbt\n? [a, b]\n: 1\n", [], PATH, ("invalid YAML", "line 3")),
    ("empty-file", "", [], PATH, ("file is empty", "mapping with name, kind")),
    ("comments-only", "# name: t\n# kind: pbt\n", [], PATH, ("file is empty",)),
    ("top-level-list", "- name: t\n- kind: pbt\n", [], PATH, ("top level must be a mapping", "got list")),
    ("top-level-scalar", "quickstart\n", [], PATH, ("top level must be a mapping", "got str")),
    ("missing-file", None, [], PATH, ("file not found",)),
    ("directory-instead-of-file", DIRECTORY, [], PATH, ("is a directory", "experiment .yaml file")),
    # --set overrides are validated like the file
    ("set-without-equals", BASE, ["pbt.population"], "--set", ("KEY=VALUE", "pbt.population=8")),
    ("set-empty-key", BASE, ["=8"], "--set", ("KEY=VALUE",)),
    ("set-empty-key-segment", BASE, ["pbt..population=8"], "--set", ("dotted names",)),
    ("set-unknown-section-key", BASE, ["pbt.populaton=8"], "pbt.populaton", ("unknown key", "allowed:", "population")),
    ("set-unknown-top-level-key", BASE, ["trainer.lr=0.1"], "trainer", ("unknown key", "allowed at top level")),
    ("set-out-of-range", BASE, ["pbt.population=1"], "pbt.population", ("greater than or equal to 2",)),
    ("set-wrong-type", BASE, ["ray.cpus_per_trial=many"], "ray.cpus_per_trial", ("valid number", "'many'")),
    ("set-through-a-scalar", BASE, ["pbt.population.min=2"], "pbt.population", ("cannot set pbt.population.min",)),
    (
        "set-unknown-kind",
        BASE,
        ["kind=evolution"],
        "kind",
        ("unknown kind 'evolution'", "allowed: federated, lpo, lpo_eval, pbt"),
    ),
    ("set-bad-uri", BASE, ["tracking.uri=mlruns"], "tracking.uri", ("sqlite:///PATH",)),
    (
        "set-later-wins",
        BASE,
        ["pbt.population=8", "pbt.population=1"],
        "pbt.population",
        ("greater than or equal to 2",),
    ),
]


@pytest.mark.parametrize(
    "content, overrides, field, hints",
    [pytest.param(c, o, f, h, id=i) for i, c, o, f, h in MALFORMED],
)
def test_malformed_experiment_is_one_error_line_and_exit_2(
    tmp_path, capsys, tripwire, content, overrides, field, hints
):
    path = write_case(tmp_path, content)
    argv = ["run", str(path), *[arg for o in overrides for arg in ("--set", o)]]
    rc, out, err = run_cli(argv, capsys)
    field = field.replace(PATH, str(path))
    hints = tuple(h.replace(PATH, str(path)) for h in hints)
    assert_one_error_line(rc, out, err, field, hints)


def test_at_least_25_malformed_cases():
    assert len(MALFORMED) >= 25
    assert len({case[0] for case in MALFORMED}) == len(MALFORMED)


def test_override_is_reported_exactly_like_the_same_mistake_in_the_file(tmp_path, capsys, tripwire):
    in_file = write_case(tmp_path, mutate(pbt__population=1))
    rc_file, _, err_file = run_cli(["run", str(in_file)], capsys)
    (tmp_path / "ok").mkdir()
    valid = write_case(tmp_path / "ok", BASE)
    rc_set, _, err_set = run_cli(["run", str(valid), "--set", "pbt.population=1"], capsys)
    assert rc_file == rc_set == 2
    assert err_file == err_set


def test_override_does_not_touch_the_file(tmp_path, capsys, tripwire):
    path = write_case(tmp_path, BASE)
    before = path.read_text()
    rc, _, _ = run_cli(["run", str(path), "--set", "pbt.population=1"], capsys)
    assert rc == 2
    assert path.read_text() == before


def test_config_error_text_is_the_cli_line(tmp_path, capsys, tripwire):
    path = write_case(tmp_path, mutate(pbt__quantile_fraction=0.9))
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.field == "pbt.quantile_fraction"
    rc, _, err = run_cli(["run", str(path)], capsys)
    assert rc == 2
    assert err == f"metaopt: error: {caught.value}\n"


# ------------------------------------------------------------------- regressions: bugs these tests once exposed
#
# Each of these is a malformed file that either crashes with a traceback instead of exit 2, or is accepted
# (and would only fail after Ray started, inside a trial), or gets a message that does not name the field.

BUGS = [
    pytest.param(
        mutate(kind=["pbt"]),
        [],
        "kind",
        ("allowed: federated, lpo, lpo_eval, pbt",),
        id="kind-is-a-list",
    ),
    pytest.param(
        mutate(kind={"name": "pbt"}),
        [],
        "kind",
        ("allowed: federated, lpo, lpo_eval, pbt",),
        id="kind-is-a-mapping",
    ),
    pytest.param(
        b"\xff\xfe\x00name: t\nkind: pbt\n",
        [],
        PATH,
        ("UTF-8",),
        id="file-not-utf8",
    ),
    pytest.param(
        mutate(pbt__lr_max=float("inf")),
        [],
        "pbt.lr_max",
        ("finite",),
        id="lr-max-infinite",
    ),
    pytest.param(
        mutate(ray__cpus_per_trial=float("inf")),
        [],
        "ray.cpus_per_trial",
        ("finite",),
        id="cpus-per-trial-infinite",
    ),
    pytest.param(
        mutate(pbt__steps_per_iteration=True, pbt__scheduler="random"),
        [],
        "pbt.steps_per_iteration",
        ("integer",),
        id="bool-for-int",
    ),
    pytest.param(
        mutate(pbt__task_options={"batch_size": True}),
        [],
        "pbt.task_options.batch_size",
        ("must be an integer, not true",),
        id="digits-batch-size-bool",
    ),
    pytest.param(
        mutate(pbt__task_options={"split_seed": "abc"}),
        [],
        "pbt.task_options.split_seed",
        ("integer",),
        id="digits-split-seed-string",
    ),
    pytest.param(
        mutate(pbt__task_options={"split_seed": -1}),
        [],
        "pbt.task_options.split_seed",
        ("greater than or equal to 0",),
        id="digits-split-seed-negative",
    ),
    pytest.param(
        mutate(pbt__task="cartpole_rllib", pbt__task_options={"bogus": 1}, pbt__optimizer={"name": "adam"}),
        [],
        "pbt.task_options.bogus",
        ("unknown key", "allowed:"),
        id="rllib-unknown-task-option",
    ),
    pytest.param(
        mutate(pbt__task="cartpole_rllib", pbt__task_options={}, pbt__optimizer={"name": "sgd", "momentum": 0.9}),
        [],
        "pbt.optimizer.momentum",
        ("not supported",),
        id="rllib-unsupported-optimizer",
    ),
    pytest.param(
        "name: t\nkind: pbt\npbt:\n  population: 2\n  population: 3\n",
        [],
        PATH,
        ("duplicate", "population"),
        id="duplicate-key",
    ),
    pytest.param(
        mutate(pbt__perturbation_factors=[1.2]),
        [],
        "pbt.perturbation_factors",
        ("pair",),
        id="perturbation-factors-one-value",
    ),
]


@pytest.mark.parametrize("content, overrides, field, hints", BUGS)
def test_malformed_experiment_bugs(tmp_path, capsys, tripwire, content, overrides, field, hints):
    test_malformed_experiment_is_one_error_line_and_exit_2(tmp_path, capsys, tripwire, content, overrides, field, hints)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"pbt__lr_min": 0.5, "pbt__lr_max": 0.1}, "pbt.lr_min"),
        ({"pbt__perturbation_interval": 5}, "pbt.perturbation_interval"),
        ({"pbt__perturbation_factors": [1.2, -0.8]}, "pbt.perturbation_factors"),
    ],
    ids=["lr-min-vs-lr-max", "interval-vs-iterations", "negative-factor"],
)
def test_cross_field_errors_name_the_field_without_dumping_the_section(tmp_path, capsys, tripwire, changes, field):
    rc, out, err = run_cli(["run", str(write_case(tmp_path, mutate(**changes)))], capsys)
    line = assert_one_error_line(rc, out, err, field, ())
    assert "(got {" not in line


def test_set_into_an_empty_section(tmp_path):
    path = write_case(tmp_path, "name: t\nkind: pbt\nray:\npbt:\n")
    assert config.load(path).section.population == 4  # the file is valid on its own
    exp = config.load(path, ["pbt.population=8", "ray.num_cpus=2"])
    assert exp.section.population == 8
    assert exp.ray.num_cpus == 2


@pytest.mark.parametrize(
    "text",
    [
        "optimizer: {name: adamw, weight_decay: 1e-4, eps: 1e-8}",
        "task_options: {val_fraction: 1e-1}",
    ],
    ids=["optimizer", "digits-options"],
)
def test_exponent_notation_in_nested_specs_is_accepted(tmp_path, text):
    path = write_case(tmp_path, f"name: t\nkind: pbt\npbt:\n  lr_min: 1e-4\n  {text}\n")
    exp = config.load(path)
    assert exp.section.lr_min == pytest.approx(1e-4)


# ------------------------------------------------------------- hostile inputs: one line, exit 2, quickly, bounded
#
# Each of these once cost a traceback, a hang, unbounded memory or an error line quoting 10 kB of input (issue 20).


def _billion_laughs() -> str:
    lines = ["name: t", "kind: pbt", 'description: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        lines.append(f"x{level}: &{chr(97 + level)} [" + ", ".join([f"*{chr(96 + level)}"] * 9) + "]")
    return "\n".join(lines) + "\n"


HUGE = "x" * 10_000
LPO_ENV = {"env": "CartPole-v1", "total_timesteps": 2048, "ppo": {"num_envs": 4, "num_steps": 64}}
POSTTRAIN_BASE: dict[str, Any] = {"name": "cfg-posttrain", "kind": "posttrain", "posttrain": {"steps": 4}}

HOSTILE = [
    # the YAML itself
    pytest.param(_billion_laughs(), [], PATH, ("invalid YAML", "100000 values", "aliases"), id="yaml-billion-laughs"),
    pytest.param(
        "name: t\nkind: pbt\npbt: " + "[" * 10_000 + "\n",
        [],
        PATH,
        ("invalid YAML", "nested deeper than 64"),
        id="yaml-10000-brackets",
    ),
    pytest.param(
        "name: t\nkind: pbt\npbt: " + "{a: " * 5_000 + "\n",
        [],
        PATH,
        ("invalid YAML", "nested deeper"),
        id="yaml-deep-mappings",
    ),
    pytest.param(
        "name: t\nkind: pbt\npbt: &p {task_options: *p}\n",
        [],
        PATH,
        ("invalid YAML", "alias *p", "contains it"),
        id="yaml-recursive-alias",
    ),
    pytest.param(
        "name: t\nkind: pbt\nray:\n  worker_preload: [" + "&s " + "a" * 900_000 + ", " + "*s, " * 20_000 + "]\n",
        [],
        PATH,
        ("invalid YAML", "100000 values"),
        id="yaml-aliases-to-one-long-string",
    ),
    pytest.param(
        "name: t\nkind: pbt\npbt:\n  population: " + "1" * 5000 + "\n",
        [],
        PATH,
        ("invalid YAML", "digits"),
        id="yaml-5000-digit-integer",
    ),
    pytest.param(
        mutate(tracking__uri="htp://alice:s3cret@mlflow:5000"),
        [],
        "tracking.uri",
        ("'htp://***@mlflow:5000'",),
        id="bad-uri-quoted-without-its-password",
    ),
    pytest.param(
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", [], PATH, ("not a UTF-8 text file",), id="binary-file"
    ),
    pytest.param(
        "name: t\nkind: pbt\npbt:\n  <<: {population: 2}\n  population: 3\n  population: 4\n",
        [],
        PATH,
        ("duplicate key 'population'",),
        id="merge-key-with-a-real-duplicate",
    ),
    pytest.param(
        "name: t\nkind: pbt\npbt:\n  <<: 5\n", [], PATH, ("invalid YAML", "merging"), id="merge-key-of-a-scalar"
    ),
    # names
    pytest.param(
        mutate(name="quickstart\n"), [], "name", ("letters, digits", "'quickstart\\n'"), id="name-trailing-newline"
    ),
    pytest.param(mutate(name="a" * 101), [], "name", ("at most 100 characters", "got 101"), id="name-101-characters"),
    pytest.param(mutate(name=HUGE), [], "name", ("at most 100 characters", "..."), id="name-10kB"),
    pytest.param(
        mutate(tracking__experiment="shared\n"),
        [],
        "tracking.experiment",
        ("newlines",),
        id="mlflow-experiment-newline",
    ),
    pytest.param(
        mutate(tracking__experiment="   "), [], "tracking.experiment", ("non-blank",), id="mlflow-experiment-blank"
    ),
    pytest.param(
        mutate(tracking__experiment="e" * 101),
        [],
        "tracking.experiment",
        ("at most 100",),
        id="mlflow-experiment-101-characters",
    ),
    # user input is quoted shortened, never whole
    pytest.param(
        mutate(pbt__scheduler=HUGE),
        [],
        "pbt.scheduler",
        (
            "'xxxxxxxx",
            "...",
        ),
        id="10kB-string-value",
    ),
    pytest.param(
        mutate(pbt__optimizer={"name": "sgd", "lr": HUGE}),
        [],
        "pbt.optimizer.lr",
        ("valid number", "..."),
        id="10kB-string-in-optimizer-spec",
    ),
    pytest.param(mutate(**{"pbt__bad\nkey": 1}), [], "pbt.'bad\\nkey'", ("unknown key",), id="key-with-newline"),
    pytest.param(
        mutate(**{f"pbt__{HUGE}": 1}),
        [],
        "pbt.'xxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxxxxxxxxxx'",
        ("unknown key",),
        id="10kB-key",
    ),
    pytest.param(
        mutate(FED_BASE, federated__strategies=[HUGE]),
        [],
        "federated.strategies",
        ("unknown strategy 'xxxxxxxx", "..."),
        id="10kB-strategy-name",
    ),
    # seeds: 0 <= seed < 2**32 in every section
    pytest.param(mutate(pbt__seed=-1), [], "pbt.seed", ("greater than or equal to 0",), id="pbt-seed-negative"),
    pytest.param(mutate(pbt__seed=2**32), [], "pbt.seed", ("less than 4294967296",), id="pbt-seed-2-32"),
    pytest.param(
        mutate(FED_BASE, federated__seeds=[0, -1]),
        [],
        "federated.seeds.1",
        ("greater than or equal to 0",),
        id="federated-seed-negative",
    ),
    pytest.param(
        mutate(FED_BASE, federated__seeds=[2**40]),
        [],
        "federated.seeds.0",
        ("less than 4294967296",),
        id="federated-seed-too-big",
    ),
    pytest.param(
        mutate(SYMBOLIC_BASE, symbolic__seeds=[2**32]),
        [],
        "symbolic.seeds.0",
        ("less than 4294967296",),
        id="symbolic-seed-too-big",
    ),
    pytest.param(
        mutate(POSTTRAIN_BASE, posttrain__seeds=[-5]),
        [],
        "posttrain.seeds.0",
        ("greater than or equal to 0",),
        id="posttrain-seed-negative",
    ),
    pytest.param(
        mutate(LPO_BASE, lpo__meta_seeds=[2**32]),
        [],
        "lpo.meta_seeds.0",
        ("less than 4294967296",),
        id="lpo-meta-seed-too-big",
    ),
    pytest.param(
        mutate(LPO_EVAL_BASE, lpo_eval__seed=-1),
        [],
        "lpo_eval.seed",
        ("greater than or equal to 0",),
        id="lpo-eval-seed-negative",
    ),
    # true/false inside numeric lists
    pytest.param(
        mutate(pbt__perturbation_factors=[True, 0.8]),
        [],
        "pbt.perturbation_factors.0",
        ("must be a number, not true",),
        id="bool-in-perturbation-factors",
    ),
    pytest.param(
        mutate(FED_BASE, federated__lrs=[0.1, True]),
        [],
        "federated.lrs.1",
        ("must be a number, not true",),
        id="bool-in-lrs",
    ),
    pytest.param(
        mutate(FED_BASE, federated__seeds=[False]),
        [],
        "federated.seeds.0",
        ("must be an integer, not false",),
        id="bool-in-seeds",
    ),
    pytest.param(
        mutate(FED_BASE, federated__hidden=[16, True]),
        [],
        "federated.hidden.1",
        ("integer",),
        id="bool-in-hidden-widths",
    ),
    pytest.param(
        mutate(SYMBOLIC_BASE, symbolic__proxy={"task": "digits", "lrs": [1.0, True]}),
        [],
        "symbolic.proxy.lrs.1",
        ("must be a number",),
        id="bool-in-proxy-lrs",
    ),
    pytest.param(
        mutate(LPO_BASE, lpo__horizons=[True]), [], "lpo.horizons.0", ("must be a number",), id="bool-in-horizons"
    ),
    # NaN / inf anywhere, also inside free-form option mappings
    pytest.param(
        mutate(pbt__task_options={"val_fraction": float("nan")}),
        [],
        "pbt.task_options.val_fraction",
        ("finite",),
        id="nan-in-task-options",
    ),
    pytest.param(
        mutate(pbt__optimizer={"name": "sgd", "lr": float("inf")}),
        [],
        "pbt.optimizer.lr",
        ("finite",),
        id="inf-in-optimizer-spec",
    ),
    pytest.param(
        mutate(FED_BASE, federated__lrs=[0.1, float("nan")]), [], "federated.lrs.1", ("finite",), id="nan-in-lrs"
    ),
    pytest.param(
        mutate(SYMBOLIC_BASE, symbolic__proxy={"task": "digits", "task_options": {"hidden": [8, float("inf")]}}),
        [],
        "symbolic.proxy.task_options.hidden.1",
        ("finite",),
        id="inf-deep-in-task-options",
    ),
    pytest.param(
        mutate(LPO_BASE, lpo__envs=[{**LPO_ENV, "ppo": {"lr": float("nan")}}]),
        [],
        "lpo.envs.0.ppo.lr",
        ("finite",),
        id="nan-in-ppo-overrides",
    ),
    pytest.param(
        mutate(POSTTRAIN_BASE, posttrain__schedule={"name": "constant", "lr": float("-inf")}),
        [],
        "posttrain.schedule.lr",
        ("finite",),
        id="inf-in-schedule-spec",
    ),
    pytest.param(
        mutate(SYMBOLIC_BASE, symbolic__margin=float("nan")), [], "symbolic.margin", ("finite",), id="nan-margin"
    ),
    pytest.param(BASE, ["pbt.lr_max=.inf"], "pbt.lr_max", ("finite",), id="set-inf"),
    # Ray addresses that are not addresses (ray.init would retry for minutes)
    pytest.param(
        mutate(ray__address="localhost"), [], "ray.address", ("HOST:PORT", "'localhost'"), id="address-no-port"
    ),
    pytest.param(
        mutate(ray__address="head:70000"), [], "ray.address", ("port in 1-65535",), id="address-port-out-of-range"
    ),
    pytest.param(mutate(ray__address="http://head:8265"), [], "ray.address", ("ray://HOST:PORT",), id="address-http"),
    pytest.param(mutate(ray__address="ray://"), [], "ray.address", ("ray://HOST:PORT",), id="address-ray-no-host"),
    pytest.param(mutate(ray__address="my head:6379"), [], "ray.address", ("HOST:PORT",), id="address-space"),
]


@pytest.mark.parametrize("content, overrides, field, hints", HOSTILE)
def test_hostile_input_is_one_short_error_line_quickly(tmp_path, capsys, tripwire, content, overrides, field, hints):
    started = time.monotonic()
    test_malformed_experiment_is_one_error_line_and_exit_2(tmp_path, capsys, tripwire, content, overrides, field, hints)
    assert time.monotonic() - started < 20
    assert (
        len(
            run_cli(["run", str(tmp_path / "experiment.yaml"), *[a for o in overrides for a in ("--set", o)]], capsys)[
                2
            ]
        )
        < 700
    ), "the error line quotes user input whole"


def test_yaml_merge_keys_merge_and_own_keys_win(tmp_path):
    text = (
        "name: t\nkind: pbt\ndescription: &common {population: 2, iterations: 4, perturbation_interval: 2}\n"
        "pbt:\n  <<: *common\n  population: 3\n  task_options:\n    <<: {hidden: [8]}\n    batch_size: 16\n"
    )
    raw = config.parse_yaml(text)
    assert raw["pbt"] == {
        "population": 3,
        "iterations": 4,
        "perturbation_interval": 2,
        "task_options": {"hidden": [8], "batch_size": 16},
    }
    exp = config.from_dict({**raw, "description": "merged"})
    assert (exp.section.population, exp.section.iterations, exp.section.task_options.hidden) == (3, 4, (8,))


def test_seeds_at_the_edges_are_accepted():
    exp = config.from_dict(mutate(FED_BASE, federated__seeds=[0, 2**32 - 1]))
    assert exp.section.seeds == [0, 2**32 - 1]
    assert config.from_dict(mutate(pbt__seed=2**32 - 1)).section.seed == 2**32 - 1


# ------------------------------------------------------------------------------------------------------ positive


def test_experiment_files_exist():
    assert len(EXPERIMENT_FILES) >= 2, EXPERIMENT_FILES


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=[p.name for p in EXPERIMENT_FILES])
def test_every_experiment_file_loads(path):
    exp = load_example(path)
    assert exp.kind in registry.kinds()
    assert exp.name and exp.description
    assert exp.source == str(path)
    raw = yaml.safe_load(path.read_text())
    assert exp.name == raw["name"]
    assert_subset(raw[exp.kind], exp.section.model_dump(mode="json"), exp.kind)


def assert_subset(written: Any, resolved: Any, where: str) -> None:
    """Every value the file wrote is in the resolved config (which also holds the defaults)."""
    if isinstance(written, dict):
        for key, value in written.items():
            assert key in resolved, f"{where}.{key}"
            assert_subset(value, resolved[key], f"{where}.{key}")
    elif isinstance(written, list):
        assert len(written) == len(resolved), where
        for i, (a, b) in enumerate(zip(written, resolved)):
            assert_subset(a, b, f"{where}.{i}")
    else:
        assert written == resolved, where


def test_quickstart_values():
    exp = config.load(REPO / "experiments" / "quickstart.yaml")
    assert exp.name == "quickstart" and exp.kind == "pbt"
    assert exp.ray.num_cpus == 2 and exp.ray.cpus_per_trial == 1.0
    assert exp.section.task == "digits"
    assert exp.section.task_options.model_dump(exclude_defaults=True) == {"hidden": (32,), "batch_size": 16}
    assert exp.section.optimizer.model_dump(exclude_unset=True) == {"name": "sgd", "momentum": 0.9}
    assert (exp.section.population, exp.section.iterations, exp.section.steps_per_iteration) == (4, 20, 50)
    assert exp.section.synch is True


def test_overrides_apply_with_the_right_types():
    path = REPO / "experiments" / "quickstart.yaml"
    plain = config.load(path)
    exp = config.load(path, ["pbt.population=8", "pbt.lr_max=0.3"])
    assert exp.section.population == 8 and type(exp.section.population) is int
    assert exp.section.lr_max == 0.3 and type(exp.section.lr_max) is float
    # nothing else changed
    assert exp.section.model_copy(update={"population": 4, "lr_max": 0.5}) == plain.section
    assert exp.ray == plain.ray and exp.tracking == plain.tracking and exp.name == plain.name


def test_overrides_parse_yaml_values_and_reach_every_block(tmp_path):
    path = REPO / "experiments" / "quickstart_tiny.yaml"
    exp = config.load(
        path,
        [
            "pbt.synch=false",
            "pbt.task_options.hidden=[16, 8]",
            "pbt.optimizer={name: adamw, lr: 0.01}",
            "pbt.scheduler=grid",
            "pbt.checkpoint_interval=2",
            "ray.num_cpus=3",
            "ray.address=null",
            f"ray.storage_path={tmp_path / 'ray_results'}",
            "tracking.uri=http://127.0.0.1:5000",
            "tracking.experiment=other",
            "name=renamed",
            "description=changed on the command line",
        ],
    )
    section = exp.section
    assert section.synch is False
    assert section.task_options.hidden == (16, 8) and section.task_options.batch_size == 32
    assert section.optimizer.model_dump(exclude_unset=True) == {"name": "adamw", "lr": 0.01}
    assert section.scheduler == "grid" and section.checkpoint_every == 2
    assert exp.ray.num_cpus == 3 and exp.ray.address is None and exp.ray.storage_path == str(tmp_path / "ray_results")
    assert exp.tracking.uri == "http://127.0.0.1:5000"
    assert exp.mlflow_experiment == "other"
    assert exp.name == "renamed" and exp.description == "changed on the command line"


def test_later_override_wins_and_value_with_equals_sign_is_kept():
    path = REPO / "experiments" / "quickstart_tiny.yaml"
    exp = config.load(path, ["pbt.population=8", "pbt.population=6", "tracking.uri=http://h:5000/?a=b"])
    assert exp.section.population == 6
    assert exp.tracking.uri == "http://h:5000/?a=b"


def _round_trip_cases():
    yield pytest.param(config.from_dict(copy.deepcopy(BASE)), id="base")
    yield pytest.param(config.from_dict({"name": "minimal", "kind": "pbt"}), id="minimal")
    for path in EXPERIMENT_FILES:
        yield pytest.param(load_example(path), id=path.name)


@pytest.mark.parametrize("exp", list(_round_trip_cases()))
def test_to_dict_round_trips(exp):
    as_dict = exp.to_dict()
    assert set(as_dict) == {"name", "kind", "description", "ray", "tracking", exp.kind}
    assert config.from_dict(as_dict, source=exp.source, check_paths=False) == exp
    # also through the forms it is logged in (JSON payload, YAML file)
    assert config.from_dict(json.loads(json.dumps(as_dict)), source=exp.source, check_paths=False) == exp
    assert config.from_dict(yaml.safe_load(yaml.safe_dump(as_dict)), source=exp.source, check_paths=False) == exp
    assert exp.to_dict() == as_dict  # to_dict does not mutate


@pytest.mark.parametrize("exp", list(_round_trip_cases()))
def test_an_experiment_is_typed_by_its_kind_and_pickles(exp):
    """``Experiment[<the kind's section>]``: the section is checked against its model, and the parametrized
    class (not a module attribute) still pickles by plain pickle, as Ray and Tune may send it."""
    import pickle

    section_model = registry.get(exp.kind).section
    assert type(exp) is config.Experiment[section_model] and type(exp.section) is section_model
    again = pickle.loads(pickle.dumps(exp))
    assert type(again) is type(exp) and again == exp
    with pytest.raises(pydantic.ValidationError):  # a section of another kind is not this kind's section
        config.Experiment[section_model](**{**dict(exp), "section": config.RayConfig()})


def test_round_trip_written_to_a_file_loads_again(tmp_path):
    exp = config.load(REPO / "experiments" / "quickstart.yaml", ["pbt.population=6"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(exp.to_dict()))
    again = config.load(path)
    assert again.to_dict() == exp.to_dict()


def test_defaults():
    exp = config.from_dict({"name": "defaults-only", "kind": "pbt"})
    assert exp.tracking.uri == "sqlite:///mlflow.db"
    assert exp.tracking.experiment is None
    assert exp.mlflow_experiment == "defaults-only"
    assert exp.description == ""
    assert exp.ray.address is None and exp.ray.num_cpus is None and exp.ray.storage_path is None
    assert exp.ray.cpus_per_trial == 1.0 and exp.ray.gpus_per_trial == 0.0
    section = exp.section
    assert section.task == "digits" and section.scheduler == "pbt"
    assert section.optimizer.model_dump(exclude_unset=True) == {"name": "sgd", "momentum": 0.9}
    assert section.population == 4 and section.iterations == 20
    assert section.checkpoint_every == section.perturbation_interval
    assert exp.source is None


def test_mlflow_experiment_name_can_be_set():
    exp = config.from_dict({"name": "a", "kind": "pbt", "tracking": {"experiment": "shared"}})
    assert exp.mlflow_experiment == "shared"
    assert exp.tracking.uri == "sqlite:///mlflow.db"


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "sqlite:////abs/path/mlflow.db",
        "http://127.0.0.1:5000",
        "https://mlflow.example.com",
        "file:./mlruns",
        "/abs/mlruns",
        "databricks",
        "postgresql://u:p@h/db",
        "mysql://u:p@h/db",
    ],
)
def test_accepted_tracking_uris(uri):
    # check_paths=False: the form only (whether a database driver is installed here is tested in test_inputs.py)
    raw = {"name": "u", "kind": "pbt", "tracking": {"uri": uri}}
    assert config.from_dict(raw, check_paths=False).tracking.uri == uri


def test_empty_blocks_mean_defaults():
    exp = config.from_dict({"name": "e", "kind": "pbt", "ray": None, "tracking": {}, "pbt": None, "description": None})
    assert exp == config.from_dict({"name": "e", "kind": "pbt"})


def test_experiment_is_frozen():
    exp = config.from_dict({"name": "f", "kind": "pbt"})
    with pytest.raises(pydantic.ValidationError, match="Instance is frozen"):
        exp.name = "other"


def test_loading_does_not_import_ray_or_run_anything(tmp_path):
    # The lazy runner import is what keeps `metaopt list` and validation free of Ray.
    code = (
        "import sys; from metaopt import config; "
        f"config.load({str(REPO / 'experiments' / 'quickstart_tiny.yaml')!r}); "
        "print('ray' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------- console script


def metaopt_script() -> str:
    candidate = Path(sys.executable).parent / "metaopt"
    found = str(candidate) if candidate.exists() else shutil.which("metaopt")
    assert found, "the metaopt console script is not installed next to the interpreter"
    return found


def test_console_script_exits_2_with_one_line(tmp_path):
    path = write_case(tmp_path, mutate(pbt__populaton=3))
    result = subprocess.run(
        [metaopt_script(), "run", str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    assert result.stderr.startswith("metaopt: error: pbt.populaton: unknown key; allowed: ")
    assert "Traceback" not in result.stderr


def test_console_script_bad_set_exits_2(tmp_path):
    path = write_case(tmp_path, BASE)
    result = subprocess.run(
        [metaopt_script(), "run", str(path), "--set", "pbt.population"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "metaopt: error: --set: expected KEY=VALUE like pbt.population=8, got 'pbt.population'"
    ]


# -------------------------------------------------------------------------------------------------- metaopt list


def test_list_experiments(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    rc, out, err = run_cli(["list", "experiments"], capsys)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == len(EXPERIMENT_FILES)
    for line, path in zip(lines, EXPERIMENT_FILES):
        fields = line.split()
        assert fields[0] == f"experiments/{path.name}"
        assert fields[1] == load_example(path).kind in registry.kinds()
        assert "INVALID" not in line
        assert load_example(path).description.splitlines()[0] in line


def test_list_defaults_to_experiments_directory(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert run_cli(["list"], capsys)[1] == run_cli(["list", "experiments"], capsys)[1]


def test_list_marks_invalid_files_and_keeps_going(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_good.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "b_bad.yaml").write_text(yaml.safe_dump(mutate(pbt__population=1)))
    (tmp_path / "c_broken.yml").write_text("name: [\n")
    (tmp_path / "notes.txt").write_text("not an experiment")
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(["list", "."], capsys)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0].split()[:2] == ["a_good.yaml", "pbt"]
    assert lines[1].split()[:2] == ["b_bad.yaml", "INVALID"] and "pbt.population" in lines[1]
    assert lines[2].split()[:2] == ["c_broken.yml", "INVALID"] and "invalid YAML" in lines[2]


def test_list_empty_directory(tmp_path, capsys):
    rc, out, err = run_cli(["list", str(tmp_path)], capsys)
    assert rc == 0 and err == ""
    assert out == f"no experiment files in {tmp_path}/\n"


def test_list_missing_directory_exits_2(tmp_path, capsys):
    rc, out, err = run_cli(["list", str(tmp_path / "nope")], capsys)
    assert_one_error_line(rc, out, err, str(tmp_path / "nope"), ("no such directory",))


def test_lpo_eval_drift_file_of_the_wrong_shape_is_one_error_line(tmp_path, capsys, tripwire):
    import numpy as np

    from metaopt.objectives.drifts import make_drift
    from metaopt.objectives.export import save_drift

    _, params = make_drift("lpo", hidden=8)
    drift_dir = save_drift(tmp_path / "drift", "lpo", params, {"hidden": 8})
    np.savez(drift_dir / "params.npz", hidden=np.zeros((8, 4), np.float32), out=np.zeros((4, 1), np.float32))
    path = write_case(tmp_path, mutate(LPO_EVAL_BASE, lpo_eval__objectives=["ppo", str(drift_dir)]))
    rc, out, err = run_cli(["run", str(path)], capsys)
    assert_one_error_line(rc, out, err, "lpo_eval.objectives", (str(drift_dir), "params.npz", "expected float32[8, 8]"))
