"""metaopt.tasks' registry and options models: one list of task names, one model per task's options."""

from __future__ import annotations

import pytest

from metaopt import config, extras
from metaopt.errors import ConfigError
from metaopt.tasks import parse_task_optimizer, parse_task_options, task_class, task_names
from metaopt.tasks.options import DigitsOptions, PPOOptions, RLlibOptimizerSpec, TinyLMOptions


def pbt(**section):
    return {"name": "t", "kind": "pbt", "pbt": section}


def test_the_registry_is_the_list_sections_accept():
    assert task_names() == ("digits", "cartpole_rllib", "tiny_lm")
    assert task_names(metaopt_optimizers=True) == ("digits", "tiny_lm")
    with pytest.raises(ConfigError) as excinfo:
        config.from_dict(pbt(task="mnist"))
    assert str(excinfo.value) == "pbt.task: unknown task 'mnist'; allowed: digits, cartpole_rllib, tiny_lm"
    # every registered task is a PBT task, with its own options filled in from its model
    section = config.from_dict(pbt(task="tiny_lm", task_options={"vocab": 8, "branching": 2})).section
    assert section.task_options == TinyLMOptions(vocab=8, branching=2)
    assert (task_class("tiny_lm").metric, task_class("tiny_lm").mode) == ("val_accuracy", "max")


def test_symbolic_proxies_take_only_tasks_trained_with_metaopt_optimizers():
    raw = {"name": "s", "kind": "symbolic", "symbolic": {"proxy": {"task": "cartpole_rllib"}}}
    with pytest.raises(ConfigError) as excinfo:
        config.from_dict(raw)
    assert excinfo.value.field == "symbolic.proxy.task"
    assert "own optimizer" in str(excinfo.value) and "allowed: digits, tiny_lm" in str(excinfo.value)


def test_options_models_keep_the_documented_defaults_and_dump_plain_data():
    assert DigitsOptions().model_dump() == {
        "hidden": (64,),
        "batch_size": 32,
        "split_seed": 0,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "device": "auto",
    }
    assert PPOOptions().fcnet_hiddens == (64, 64) and PPOOptions().gamma == 0.99
    assert DigitsOptions(hidden=16).hidden == (16,)  # one int: one layer
    section = config.from_dict(pbt(task_options={"hidden": [16, 8]})).section
    assert section.model_dump(mode="json")["task_options"]["hidden"] == [16, 8]
    assert parse_task_options("digits", section.task_options) is section.task_options


@pytest.mark.parametrize(
    ("options", "field", "hint"),
    [
        ({"hidden": []}, "task_options.hidden", "positive layer widths"),
        ({"val_fraction": 0.5}, "task_options.val_fraction", "less than 0.5"),
        ({"device": "tpu"}, "task_options.device", "'auto', 'cpu' or 'cuda'"),
        ({"split_seed": True}, "task_options.split_seed", "integer"),
    ],
)
def test_digits_options_name_the_field(options, field, hint):
    with pytest.raises(ConfigError) as excinfo:
        parse_task_options("digits", options)
    assert excinfo.value.field == field and hint in str(excinfo.value)


def test_tiny_lm_options_check_their_shapes_together():
    with pytest.raises(ConfigError, match=r"^task_options\.branching: must be <= vocab \(5 > 4\)$"):
        parse_task_options("tiny_lm", {"vocab": 4, "branching": 5})
    with pytest.raises(ConfigError, match=r"^task_options\.data_seed: "):
        parse_task_options("tiny_lm", {"data_seed": -1})


def test_rllib_task_takes_only_the_name_of_its_adam():
    assert parse_task_optimizer("cartpole_rllib", {}) == RLlibOptimizerSpec(name="adam")
    with pytest.raises(ConfigError) as excinfo:
        parse_task_optimizer("cartpole_rllib", {"name": "adam", "lr": 0.1})
    assert excinfo.value.field == "optimizer.lr" and "RLlib's own torch Adam" in str(excinfo.value)
    # the other tasks take any metaopt.optim optimizer
    assert parse_task_optimizer("digits", {"name": "lion"}).name == "lion"


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setattr(extras, "is_installed", lambda module: module not in ("tree", "GPy"))
    with pytest.raises(ConfigError) as excinfo:
        config.from_dict(pbt(task="cartpole_rllib", optimizer={"name": "adam"}))
    assert str(excinfo.value).startswith("pbt.task: needs the optional dependencies of metaopt-platform[rllib]")
    with pytest.raises(ConfigError) as excinfo:
        config.from_dict(pbt(scheduler="pb2"))
    assert str(excinfo.value).startswith("pbt.scheduler: needs the optional dependencies of metaopt-platform[pb2]")
