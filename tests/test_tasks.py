"""metaopt.tasks' registry and options models: one list of task names, one model per task's options."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
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
    assert str(excinfo.value) == (
        "pbt.task: unknown task 'mnist'; allowed: digits, cartpole_rllib, tiny_lm, "
        "or your own 'module:function' factory"
    )
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


# ---- numbers are given as numbers ---------------------------------------------------------------------------

RLLIB = {"task": "cartpole_rllib", "optimizer": {"name": "adam"}}


@pytest.mark.parametrize(
    ("section", "option", "value", "expected"),
    [
        ({}, "batch_size", "8", "valid integer"),
        ({}, "split_seed", 3.0, "valid integer"),
        ({}, "val_fraction", "0.1", "valid number"),
        ({}, "batch_size", 16.0, "valid integer"),
        ({"task": "tiny_lm"}, "vocab", "16", "valid integer"),
        ({"task": "tiny_lm"}, "data_seed", 1.0, "valid integer"),
        (RLLIB, "train_batch_size", "1000", "valid integer"),
        (RLLIB, "minibatch_size", 128.0, "valid integer"),
        (RLLIB, "gamma", "0.99", "valid number"),
        (RLLIB, "num_epochs", True, "must be an integer, not true"),
    ],
)
def test_task_options_refuse_strings_and_fractions_where_numbers_go(section, option, value, expected):
    with pytest.raises(ConfigError) as excinfo:
        config.from_dict(pbt(**section, task_options={option: value}))
    message = str(excinfo.value)
    assert excinfo.value.field == f"pbt.task_options.{option}" and "\n" not in message
    assert expected in message and repr(value).lower() in message.lower()


def test_task_options_take_yaml_lists_for_tuples_and_integers_of_any_kind_where_numbers_go():
    options = parse_task_options("cartpole_rllib", {"fcnet_hiddens": [32], "gamma": 1, "train_batch_size": 256})
    assert options == PPOOptions(fcnet_hiddens=(32,), gamma=1.0, train_batch_size=256)
    digits = parse_task_options("digits", {"batch_size": np.int64(8), "split_seed": np.int64(3)})
    assert (digits.batch_size, digits.split_seed) == (8, 3) and type(digits.batch_size) is int


# ---- the validation context reaches the task's fields ----------------------------------------------------------


def test_a_relative_program_file_in_pbt_optimizer_is_the_same_error_as_in_posttrain_optimizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = {"name": "program", "program": "no_such_program.txt"}
    posttrain = {"name": "t", "kind": "posttrain", "posttrain": {"steps": 4, "optimizer": spec}}
    problems = {}
    for kind, raw in (("pbt", pbt(optimizer=spec)), ("posttrain", posttrain)):
        with pytest.raises(ConfigError) as excinfo:
            config.from_dict(raw)
        assert excinfo.value.field == f"{kind}.optimizer.program"
        problems[kind] = excinfo.value.problem
    assert problems["pbt"] == problems["posttrain"]
    assert (
        problems["pbt"].startswith("'no_such_program.txt' is not") and "relative paths are read from" in problems["pbt"]
    )


def test_a_relative_program_file_in_pbt_optimizer_is_read_from_the_contexts_base(tmp_path, monkeypatch):
    from metaopt.pbt.config import PBTSection
    from metaopt.symbolic.search import load_start_program
    from metaopt.symbolic.text import format_program

    (tmp_path / "lion.txt").write_text(format_program(load_start_program("lion")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the file is not here: only the context's base finds it
    raw = {"optimizer": {"name": "program", "program": "lion.txt"}}
    section = PBTSection.model_validate(raw, context={"base": str(tmp_path), "check_paths": True})
    assert section.optimizer.program == str(tmp_path / "lion.txt")


# ---- extras are needed where the experiment runs --------------------------------------------------------------


def hide_modules(monkeypatch, *missing: str) -> None:
    """Make ``find_spec`` report ``missing`` as not installed (as tests/test_extras.py does)."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a)
    )
    for module in missing:
        monkeypatch.delitem(sys.modules, module, raising=False)


@pytest.mark.parametrize(
    ("section", "field", "extra"),
    [(RLLIB, "pbt.task", "rllib"), ({"scheduler": "pb2"}, "pbt.scheduler", "pb2")],
)
def test_an_extra_is_required_by_metaopt_run_but_not_by_submit_or_list(monkeypatch, section, field, extra):
    hide_modules(monkeypatch, "tree", "GPy")
    with pytest.raises(ConfigError) as excinfo:
        config.from_dict(pbt(**section))  # metaopt run: the sweep runs here
    assert excinfo.value.field == field and f"metaopt-platform[{extra}]" in str(excinfo.value)
    # metaopt submit / list: the cluster has its own packages; nothing of the extra is imported here either
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # `import gymnasium` now fails
    experiment = config.from_dict(pbt(**section), check_paths=False)
    name = field.removeprefix("pbt.")
    assert getattr(experiment.section, name) == section[name]


def test_tiny_lm_val_loss_task_is_tiny_lm_scored_by_validation_cross_entropy():
    """The factory a claim in validation loss names (task: metaopt.tasks.tiny_lm:val_loss_task): PBT ranks on it."""
    import torch

    from metaopt.tasks import task_metric_mode
    from metaopt.tasks.tiny_lm import val_loss_task

    options, optimizer = {"seq_len": 8, "d_model": 8, "val_sequences": 16}, {"name": "adamw"}
    assert task_metric_mode("metaopt.tasks.tiny_lm:val_loss_task", options, optimizer, 0) == ("val_loss", "min")
    task = val_loss_task(options, parse_task_optimizer("tiny_lm", optimizer), 0)
    metrics = task.train(2, lambda _step: 1e-3)
    val = task.data["val"]
    with torch.no_grad():
        logits = task.model(val[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[:, 1:].reshape(-1))
    assert metrics["val_loss"] == pytest.approx(expected.item(), rel=1e-6)
