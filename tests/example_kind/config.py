"""The ``linefit:`` section of an experiment file, and the capability's one registration object."""

from __future__ import annotations

from pydantic import Field

from metaopt.config import Seed, StrictModel
from metaopt.registry import Capability, Command


class LineFitSection(StrictModel):
    """Data ``y = slope * x + noise`` with standard-normal ``x``; gradient descent on the squared error."""

    slope: float = Field(default=2.0, description="Slope of the line the data is drawn from.")
    noise: float = Field(default=0.1, ge=0, description="Standard deviation of the noise added to y.")
    points: int = Field(default=200, ge=2, le=100_000, description="How many (x, y) pairs.")
    lr: float = Field(default=0.1, gt=0, lt=1, description="Step size; below 1 it converges (E[x^2] = 1).")
    steps: int = Field(default=100, ge=1, le=100_000, description="Gradient-descent steps.")
    seed: Seed = Field(default=0, description="Seed of the data.")


def add_loss_arguments(parser) -> None:
    parser.add_argument("file", help="a linefit experiment file")
    parser.add_argument("--slope", type=float, required=True, help="the slope whose loss to print")


LOSS = Command(
    name="linefit-loss",
    help="print the squared error of a slope on a linefit experiment's data",
    add_arguments=add_loss_arguments,
    handler="example_kind.fit:print_loss",
)

CAPABILITY = Capability(kind="linefit", section=LineFitSection, runner="example_kind.fit:run", commands=(LOSS,))
