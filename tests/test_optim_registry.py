"""metaopt.optim's specs and registry: models chosen by name, registered providers, plain data for Tune."""

from __future__ import annotations

import pickle
import subprocess
import sys
from typing import Literal

import pytest
import torch
from pydantic import Field

from metaopt.config import StrictModel
from metaopt.errors import ConfigError
from metaopt.optim import (
    OptimizerSpec,
    OptionalScheduleSpec,
    build_optimizer,
    build_schedule,
    optimizer_names,
    resolve_optimizer_spec,
)
from metaopt.optim.optimizers import SGDSpec
from metaopt.optim.schedules import CosineSchedule
from metaopt.optim.specs import NamedSpec, NamedSpecs


def test_importing_optim_imports_no_capability_no_task_and_no_torch():
    """optim sits below tasks and capabilities; validating a spec must not pay for torch or jax either."""
    code = (
        "import sys, metaopt.optim\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('metaopt.symbolic', 'metaopt.tasks', 'metaopt.pbt',"
        " 'metaopt.posttrain')) or m in ('torch', 'jax', 'optax'))\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == ""


def test_program_optimizer_comes_from_the_symbolic_capability():
    from metaopt import registry

    assert registry.get("symbolic").provides == ("metaopt.symbolic.optimizer:register",)
    assert "program" in optimizer_names()


def test_a_program_spec_keeps_its_file_and_resolves_to_the_program(tmp_path):
    from metaopt.symbolic.search import load_start_program
    from metaopt.symbolic.text import format_program

    path = tmp_path / "lion.txt"
    path.write_text(format_program(load_start_program("lion")))
    spec = {"name": "program", "program": str(path)}
    resolved = resolve_optimizer_spec(spec)
    assert resolved == {"name": "program", "lr": 1.0, "program": load_start_program("lion").to_json()}
    path.unlink()  # resolved: no longer depends on the file
    optimizer = build_optimizer([torch.zeros(2, requires_grad=True)], resolved)
    assert optimizer.program.to_json() == resolved["program"]


class Holder(StrictModel):
    optimizer: OptimizerSpec = Field(default_factory=lambda: {"name": "adamw"}, validate_default=True)
    schedule: OptionalScheduleSpec = None


def test_spec_fields_hold_models_and_dump_plain_data_that_validates_again():
    holder = Holder.model_validate(
        {"optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"name": "cosine", "lr": 0.1, "total_steps": 10}}
    )
    assert isinstance(holder.optimizer, SGDSpec) and isinstance(holder.schedule, CosineSchedule)
    plain = holder.model_dump(mode="json")  # what rides in a Tune param_space
    assert plain["optimizer"] == {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
    assert plain["schedule"]["warmup_steps"] == 0
    assert Holder.model_validate(plain) == holder == pickle.loads(pickle.dumps(holder))
    assert Holder.model_validate({}).schedule is None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"optimizer": {"name": "sgd", "momentum": 1.0}}, "optimizer.momentum"),
        ({"optimizer": ["sgd"]}, "optimizer"),
        ({"schedule": {"name": "cosine", "lr": 0.1, "total_steps": 5, "warmup_steps": 5}}, "schedule.warmup_steps"),
        ({"schedule": {"name": "linear", "lr": 0.1}}, "schedule.name"),
    ],
)
def test_spec_fields_report_the_users_path(raw, field):
    from pydantic import ValidationError

    from metaopt.config import first_error

    with pytest.raises(ValidationError) as excinfo:
        Holder.model_validate(raw)
    error = first_error("", Holder, excinfo.value)
    assert error.field == field and "\n" not in str(error)


def test_builders_take_a_model_as_well_as_a_mapping():
    model = SGDSpec(lr=0.25, momentum=0.0)
    optimizer = build_optimizer([torch.zeros(1, requires_grad=True)], model)
    assert optimizer.param_groups[0]["lr"] == 0.25 and optimizer.param_groups[0]["momentum"] == 0.0
    schedule = build_schedule(CosineSchedule(lr=0.2, total_steps=4))
    assert schedule(0) == pytest.approx(0.2) and schedule(4) == 0.0


class Adagrad(NamedSpec):
    name: Literal["adagrad"] = "adagrad"
    lr: float = 0.01


class Other(NamedSpec):
    name: Literal["adagrad"] = "adagrad"


def test_a_named_spec_table_dispatches_on_name_and_refuses_conflicts():
    loaded = []
    table: NamedSpecs[NamedSpec] = NamedSpecs("optimizer", lambda: loaded.append(True))
    table.register("adagrad", Adagrad)
    table.register("adagrad", Adagrad)  # the same registration again is harmless
    assert table.parse({"name": "adagrad", "lr": 0.1}) == Adagrad(lr=0.1) and loaded
    with pytest.raises(ValueError, match="already registered"):
        table.register("adagrad", Other)
    with pytest.raises(TypeError, match="answers to 'adagrad'"):
        table.register("rmsprop", Adagrad)
    with pytest.raises(ConfigError) as excinfo:
        table.parse({"name": "sgd"}, field="pbt.optimizer")
    assert str(excinfo.value) == "pbt.optimizer.name: must be one of adagrad; got 'sgd'"
    with pytest.raises(ConfigError) as excinfo:
        table.parse({"name": "adagrad", "rho": 0.9})
    assert excinfo.value.field == "optimizer.rho" and "allowed: lr, name" in str(excinfo.value)
