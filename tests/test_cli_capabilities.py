"""Adding a capability, kept true: the example kind of ``tests/example_kind/`` (a folder, a section model, a
runner, one registration line) runs, validates, lists and adds its verb through the real CLI, in-process.

docs/architecture.md quotes this example; if these tests pass, what it says still works. No Ray starts here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from example_kind.config import CAPABILITY, LineFitSection
from example_kind.fit import fit_slope, make_data
from metaopt import cli, config, registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "tests" / "example_kind"


@pytest.fixture
def linefit():
    """The one registration line, undone after the test."""
    registry.register(CAPABILITY)
    yield CAPABILITY
    registry.unregister(CAPABILITY.kind)


def write(tmp_path, section: dict, name: str = "fit") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": name, "kind": "linefit", "description": "a tiny line fit", "linefit": section}, sort_keys=False
        )
    )
    return str(path)


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, (out, err)
    return err.rstrip("\n")


def test_gradient_descent_reaches_the_least_squares_slope():
    """The library is the oracle: numpy's least squares gives the slope gradient descent must converge to."""
    section = LineFitSection(slope=-1.5, noise=0.3, points=50, lr=0.2, steps=200, seed=3)
    x, y = make_data(section)
    (oracle,), *_ = np.linalg.lstsq(x[:, None], y, rcond=None)
    assert fit_slope(x, y, section.lr, section.steps).slope == pytest.approx(oracle, abs=1e-9)
    assert abs(oracle - section.slope) < 0.2  # and the data holds the line it was drawn from


def test_metaopt_run_validates_the_section_and_runs_the_kind(linefit, tmp_path, capsys):
    path = write(tmp_path, {"slope": 3.0, "steps": 150})
    exp = config.load(path)
    assert type(exp) is config.Experiment[LineFitSection] and exp.section.points == 200  # default filled in

    assert cli.main(["run", path, "--set", "linefit.seed=7"]) == 0
    line = capsys.readouterr().out.strip()
    x, y = make_data(LineFitSection(slope=3.0, steps=150, seed=7))
    assert line.startswith(f"fit: slope {fit_slope(x, y, 0.1, 150).slope:.6f} after 150 steps")


@pytest.mark.parametrize(
    ("section", "override", "expected"),
    [
        ({"lr": 2}, None, "metaopt: error: linefit.lr: Input should be less than 1 (got 2)"),
        ({}, "linefit.points=1", "metaopt: error: linefit.points: Input should be greater than or equal to 2 (got 1)"),
        (
            {"slop": 2},
            None,
            "metaopt: error: linefit.slop: unknown key; allowed: lr, noise, points, seed, slope, steps",
        ),
        ({"steps": True}, None, "metaopt: error: linefit.steps: must be an integer, not true (got True)"),
    ],
)
def test_a_bad_field_is_one_error_line_and_exit_2(linefit, tmp_path, capsys, section, override, expected):
    argv = ["run", write(tmp_path, section), *(["--set", override] if override else [])]
    assert cli.main(argv) == 2
    assert one_error_line(capsys) == expected


def test_metaopt_list_shows_the_kind(linefit, tmp_path, capsys):
    write(tmp_path, {}, name="a_fit")
    write(tmp_path, {"lr": 0}, name="b_bad")
    assert cli.main(["list", str(tmp_path)]) == 0
    good, bad = capsys.readouterr().out.splitlines()
    assert good.split()[1:] == ["linefit", "a", "tiny", "line", "fit"]
    assert bad.split()[1] == "INVALID" and "linefit.lr: Input should be greater than 0" in bad


def test_the_kind_s_verb_is_in_help_and_runs(linefit, tmp_path, capsys):
    with pytest.raises(SystemExit) as help_exit:
        cli.main(["--help"])
    assert help_exit.value.code == 0
    assert "linefit-loss" in capsys.readouterr().out

    path = write(tmp_path, {"noise": 0.0})
    assert cli.main(["linefit-loss", path, "--slope", "2"]) == 0  # the data's own line: no error at all
    assert capsys.readouterr().out == "0.000000\n"
    assert cli.main(["linefit-loss", path, "--slope", "1"]) == 0  # (2 - 1)^2 E[x^2] on 200 points
    assert float(capsys.readouterr().out) == pytest.approx(np.mean(make_data(LineFitSection(noise=0.0))[0] ** 2))

    assert cli.main(["linefit-loss", write(tmp_path, {"noise": -1}), "--slope", "1"]) == 2  # the verb's errors too
    assert one_error_line(capsys).startswith("metaopt: error: linefit.noise: Input should be greater than or equal")


def test_without_its_registration_the_kind_is_unknown(tmp_path, capsys):
    assert cli.main(["run", write(tmp_path, {})]) == 2
    assert one_error_line(capsys).startswith("metaopt: error: kind: unknown kind 'linefit'; allowed: federated, ")
    with pytest.raises(SystemExit):
        cli.main(["linefit-loss", "x.yaml", "--slope", "1"])  # argparse: invalid choice
    assert "invalid choice: 'linefit-loss'" in capsys.readouterr().err


def test_docs_architecture_quotes_this_example_as_it_is(linefit, tmp_path, capsys):
    """What docs/architecture.md shows of the example is in its source, and the console lines it shows are what
    the CLI prints."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    source = "".join((EXAMPLE / name).read_text() for name in ("config.py", "fit.py"))
    for line in [
        'CAPABILITY = Capability(kind="linefit", section=LineFitSection, runner="example_kind.fit:run", '
        "commands=(LOSS,))",
        "def run(exp: Experiment[LineFitSection], *, address: str | None = None, verbose: int = 1) -> Fit:",
        "result = fit_slope(*make_data(section), section.lr, section.steps)",
        'lr: float = Field(default=0.1, gt=0, lt=1, description="Step size; below 1 it converges (E[x^2] = 1).")',
    ]:
        assert line in source and line in doc, line
    path = write(tmp_path, {"slope": 3.0})
    assert cli.main(["run", path]) == 0
    assert capsys.readouterr().out.splitlines()[0] in doc
    assert cli.main(["run", path, "--set", "linefit.lr=2"]) == 2
    assert one_error_line(capsys) in doc
