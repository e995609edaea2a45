"""The ``program`` optimizer: an optimizer program as a metaopt optimizer choice (Chen et al. 2023 use a
discovered program, Lion, as a drop-in optimizer).

``{"name": "program", "program": ..., "lr": 1.0}`` is accepted wherever an optimizer spec is (``pbt.optimizer``,
``posttrain.optimizer``, the symbolic search's own proxies). ``program`` is program text, its JSON, a file
holding either, or ``adamw`` / ``lion``; ``lr`` defaults to 1.0 because programs scale it themselves (AdamW's
program multiplies it by 0.001).

:mod:`metaopt.optim` does not import this package: :func:`register` is named in the symbolic capability's
``provides`` (``symbolic/config.py``), which :func:`metaopt.optim.load_optimizer_providers` runs the first time an
optimizer name is looked up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from metaopt.errors import ConfigError
from metaopt.optim import OptimizerSpecModel, register_optimizer
from metaopt.optim.specs import LearningRate
from metaopt.symbolic.program_files import absolute_program

if TYPE_CHECKING:
    from metaopt.symbolic.program import Program


class ProgramSpec(OptimizerSpecModel):
    """An optimizer program run by :class:`metaopt.symbolic.export.ProgramOptimizer` (torch) or
    :func:`metaopt.symbolic.export.program_optax` (optax)."""

    name: Literal["program"] = "program"
    lr: LearningRate = 1.0
    program: str = Field(description="Program text, its JSON, a file holding either, or adamw / lion.")

    @field_validator("program")
    @classmethod
    def _a_valid_program(cls, value: str, info: ValidationInfo) -> str:
        # A file name is stored as an absolute path (trials run in folders of their own, where a relative one
        # means nothing); the program is read and checked now, so a bad one fails before any training.
        value = absolute_program(value, info)
        read_program(value)
        return value

    def to_program(self) -> Program:
        return read_program(self.program)

    def resolved(self) -> dict[str, Any]:
        """The program as its canonical JSON: plain data that no longer depends on a file."""
        return {**self.model_dump(), "program": self.to_program().to_json()}


def read_program(value: str) -> Program:
    """Any accepted program form -> a valid :class:`Program`; a ConfigError on the field itself otherwise."""
    from metaopt.symbolic.search import load_start_program

    try:
        return load_start_program(value)
    except ConfigError as err:
        raise ConfigError("", err.problem) from None


def _torch_program(params: Any, spec: ProgramSpec) -> Any:
    from metaopt.symbolic.export import ProgramOptimizer

    return ProgramOptimizer(params, spec.to_program(), lr=spec.lr)


def _optax_program(spec: ProgramSpec) -> Any:
    import optax

    from metaopt.symbolic.export import program_optax

    program = spec.to_program()
    return optax.inject_hyperparams(lambda learning_rate: program_optax(program, learning_rate))(learning_rate=spec.lr)


def register() -> None:
    """Make ``program`` an optimizer choice (the symbolic capability's ``provides`` hook)."""
    register_optimizer("program", ProgramSpec, _torch_program, _optax_program)
