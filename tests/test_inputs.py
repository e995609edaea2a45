"""Inputs and paths (issue 20): relative paths mean the directory the user ran from, special and hostile files are
never read unbounded, and every bad input (a replay payload, a Ray address, a database URI without its driver) is
one line ``metaopt: error: ...`` with exit code 2, quickly, before Ray or MLflow start.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaopt import config
from metaopt.cli import main
from metaopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PBT: dict[str, Any] = {
    "name": "inputs",
    "kind": "pbt",
    "pbt": {
        "task_options": {"hidden": [8], "batch_size": 16},
        "population": 2,
        "iterations": 2,
        "steps_per_iteration": 5,
        "perturbation_interval": 1,
    },
}


def lion_text() -> str:
    from metaopt.symbolic.program import lion_program
    from metaopt.symbolic.text import format_program

    return format_program(lion_program())


def with_section(kind: str, section: dict[str, Any], **top: Any) -> dict[str, Any]:
    base = copy.deepcopy(PBT) if kind == "pbt" else {"name": "inputs", "kind": kind}
    base.setdefault(kind, {}).update(section)
    return {**base, **top}


def assert_one_line(rc: int, err: str, field: str) -> str:
    assert rc == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"metaopt: error: {field}: "), err
    assert "Traceback" not in err and len(err) < 700, err
    return err


@pytest.fixture
def deadline():
    """A hang (reading a FIFO, /dev/zero) fails the test after 30 s instead of blocking the suite."""

    def hung(*_):
        raise TimeoutError("input not refused within 30 s: read without a bound?")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def tripwire(monkeypatch):
    def runner_for(kind):
        raise AssertionError(f"validation accepted the file: metaopt run would now start the {kind!r} runner")

    monkeypatch.setattr(config, "runner_for", runner_for)


# ------------------------------------------------------------------------------------------ relative paths and ~


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory the user runs from, holding a program file, a data directory and a model directory; HOME too."""
    (tmp_path / "progs").mkdir()
    (tmp_path / "progs" / "lion.txt").write_text(lion_text())
    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "progs"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_relative_paths_are_absolute_against_the_directory_run_from(workdir):
    program = str(workdir / "progs" / "lion.txt")
    assert config.from_dict(with_section("symbolic", {"start": "progs/lion.txt"})).section.start == program
    assert config.from_dict(with_section("symbolic", {"start": "~/lion.txt"})).section.start == program
    assert config.from_dict(with_section("symbolic", {"start": "./progs/../progs/lion.txt"})).section.start == program
    fed = config.from_dict(with_section("federated", {"dataset": "fashion_mnist", "data_root": "data"})).section
    assert fed.data_root == str(workdir / "data")
    model = config.from_dict(with_section("posttrain", {"model": {"path": "model"}, "steps": 2})).section.model
    assert model.path == str(workdir / "model")
    spec = {"name": "program", "program": "progs/lion.txt", "lr": 0.001}
    pbt = config.from_dict(with_section("pbt", {"optimizer": spec})).section
    assert pbt.optimizer.model_dump() == {**spec, "program": program}
    post = config.from_dict(with_section("posttrain", {"optimizer": {**spec, "program": "~/lion.txt"}, "steps": 2}))
    assert post.section.optimizer.program == program
    # built-in names and program text are not paths
    assert config.from_dict(with_section("symbolic", {"start": "lion"})).section.start == "lion"
    inline = {"name": "program", "program": lion_text()}
    assert config.from_dict(with_section("pbt", {"optimizer": inline})).section.optimizer.program == inline["program"]


def test_relative_paths_in_overrides_are_resolved_too(workdir):
    path = workdir / "exp.yaml"
    path.write_text(yaml.safe_dump(with_section("symbolic", {"start": "adamw"})))
    exp = config.load(path, ["symbolic.start=progs/lion.txt"])
    assert exp.section.start == str(workdir / "progs" / "lion.txt")


def test_a_trial_in_its_own_folder_reads_the_resolved_paths(workdir, monkeypatch):
    """What a Tune trial does: rebuild its section from the logged config, from another directory, and use it."""
    from metaopt.optim import resolve_optimizer_spec
    from metaopt.symbolic.config import SymbolicSection
    from metaopt.symbolic.search import load_start_program

    exp = config.from_dict(with_section("symbolic", {"start": "progs/lion.txt"}))
    spec = config.from_dict(with_section("pbt", {"optimizer": {"name": "program", "program": "progs/lion.txt"}}))
    trial_dir = workdir / "ray_results" / "trial_0"
    trial_dir.mkdir(parents=True)
    monkeypatch.chdir(trial_dir)
    section = SymbolicSection.model_validate(exp.section.model_dump(mode="json"))
    assert load_start_program(section.start).to_json() == load_start_program("lion").to_json()
    assert resolve_optimizer_spec(spec.section.optimizer)["program"] == load_start_program("lion").to_json()


@pytest.mark.parametrize(
    "section, field",
    [
        (("symbolic", {"start": "progs/missing.txt"}), "symbolic.start"),
        (("federated", {"dataset": "cifar10", "data_root": "no_such_dir"}), "federated.data_root"),
        (("federated", {"dataset": "cifar10", "data_root": "progs/lion.txt"}), "federated.data_root"),
        (("posttrain", {"model": {"path": "~/no_model"}, "steps": 2}), "posttrain.model.path"),
        (("pbt", {"optimizer": {"name": "program", "program": "missing.txt"}}), "pbt.optimizer.program"),
        (
            ("posttrain", {"optimizer": {"name": "program", "program": "missing.txt"}, "steps": 2}),
            "posttrain.optimizer.program",
        ),
    ],
    ids=["symbolic-start", "data-root", "data-root-a-file", "model-path", "pbt-program", "posttrain-program"],
)
def test_a_path_that_does_not_exist_is_one_error_at_load_naming_the_field(workdir, capsys, tripwire, section, field):
    path = workdir / "exp.yaml"
    path.write_text(yaml.safe_dump(with_section(*section)))
    rc = main(["run", str(path)])
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line(rc, err, field)
    if field in ("federated.data_root", "posttrain.model.path"):  # data on a cluster: list and submit do not check
        assert config.load(path, check_paths=False).kind == section[0]


def test_metaopt_run_from_another_directory_with_a_relative_program_file(tmp_path):
    """End to end: a symbolic search whose start program is a relative file runs from the directory the user is in
    (each Tune trial runs in a folder of its own, where the relative path would name nothing)."""
    (tmp_path / "lion.txt").write_text(lion_text())
    raw = yaml.safe_load((REPO / "experiments" / "symbolic_tiny.yaml").read_text())
    raw["symbolic"].update(
        start="lion.txt",
        population=2,
        evaluations=2,
        batch=1,
        funnel=[],
        meta_validation=None,
        funnel_top=1,
        proxy={"task": "digits", "task_options": {"hidden": [8]}, "steps": 5, "lrs": [1.0]},
    )
    raw["ray"] = {"num_cpus": 1, "cpus_per_trial": 1, "worker_preload": []}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "metaopt.cli", "run", "exp.yaml", "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "FAILED" not in result.stdout, result.stdout[-3000:]


# --------------------------------------------------------------------- special files: never read without a bound


def special_file(tmp_path: Path, kind: str) -> Path:
    if kind == "dev-zero":
        return Path("/dev/zero")
    path = tmp_path / f"special-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "binary":
        path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    elif kind == "huge":
        path.write_text("# " + "x" * (config.MAX_FILE_BYTES + 10) + "\n")
    return path


SPECIAL = ["dev-zero", "fifo", "binary", "huge"]
HINTS = {
    "dev-zero": "not a regular file",
    "fifo": "not a regular file",
    "binary": "not a UTF-8 text file",
    "huge": "larger than 1 MiB",
}


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="POSIX special files")
@pytest.mark.parametrize("kind", SPECIAL)
def test_special_file_as_the_experiment_file(tmp_path, capsys, deadline, tripwire, kind):
    path = special_file(tmp_path, kind)
    started = time.monotonic()
    rc = main(["run", str(path)])
    err = capsys.readouterr().err
    assert HINTS[kind] in assert_one_line(rc, err, str(path))
    assert time.monotonic() - started < 10


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="POSIX special files")
@pytest.mark.parametrize("where", ["symbolic.start", "pbt.optimizer.program"])
@pytest.mark.parametrize("kind", SPECIAL)
def test_special_file_as_a_program_file(tmp_path, capsys, deadline, tripwire, kind, where):
    program = str(special_file(tmp_path, kind))
    if where == "symbolic.start":
        raw = with_section("symbolic", {"start": program})
    else:
        raw = with_section("pbt", {"optimizer": {"name": "program", "program": program}})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc = main(["run", str(path)])
    assert HINTS[kind] in assert_one_line(rc, capsys.readouterr().err, where)


# ------------------------------------------------------------------------------------------------ metaopt list


@pytest.mark.parametrize(
    "description, shown", [("   \n  \n", ""), ("\n\n  second line is the first  \nthird", "second")]
)
def test_list_shows_the_first_non_blank_description_line(tmp_path, capsys, description, shown):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({**PBT, "description": description}))
    rc = main(["list", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    assert out.split()[1] == "pbt" and "INVALID" not in out
    assert (shown in out) and out.count("\n") == 1


# ---------------------------------------------------------------------------------------------- metaopt replay


def valid_payload() -> dict[str, Any]:
    exp = config.from_dict(PBT)
    return {
        "experiment": exp.to_dict(),
        "metric": "val_accuracy",
        "mode": "max",
        "steps_per_iteration": 5,
        "total_steps": 10,
        "best_trial": "t1",
        "parent_run_id": None,
        "trials": {
            "t1": {
                "tag": "",
                "schedule": [[0, 0.1], [5, 0.05]],
                "carried_schedule": [],
                "final_metric": 0.5,
                "diverged": False,
            }
        },
    }


def broken(**changes: Any) -> str:
    payload = valid_payload()
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = payload
        for part in parents:
            node = node[part]
        node[last] = value
    return json.dumps(payload)


@pytest.mark.parametrize(
    "text, hint",
    [
        ("[1, 2, 3]", "expected a JSON object, got list"),
        ("{}", "experiment"),
        ("42", "got int"),
        ('"schedules"', "got str"),
        ("null", "got NoneType"),
        ("{not json", "not a schedules JSON file"),
        ("\x00\x01binary", "not a schedules JSON file"),
        (broken(trials={}), "trials"),
        (broken(trials__t1__schedule="fast"), "trials.t1.schedule"),
        (broken(trials__t1__schedule=[[0, 0.1], [0, 0.2]]), "trials.'t1'.schedule"),
        (broken(trials__t1__schedule=[[3, 0.1]]), "must be 0"),
        (broken(trials__t1__schedule=[[0, -1.0]]), "trials.'t1'.schedule"),
        (broken(trials__t1__final_metric="good"), "final_metric"),
        (broken(total_steps=True), "total_steps"),
        (broken(best_trial="t9"), "best_trial 't9'"),
        (broken(experiment={"name": "x", "kind": "federated"}), "not pbt"),
        (broken(experiment__pbt__seed=-1), "experiment.pbt.seed"),
        (broken(experiment__pbt__task="mnist"), "experiment.pbt.task"),
        (broken(experiment="x" * 10_000), "experiment"),
    ],
    ids=[
        "list",
        "empty-object",
        "number",
        "string",
        "null",
        "not-json",
        "binary",
        "no-trials",
        "schedule-a-string",
        "schedule-not-increasing",
        "schedule-not-from-0",
        "schedule-negative-lr",
        "metric-a-string",
        "total-steps-bool",
        "unknown-best-trial",
        "not-a-pbt-experiment",
        "negative-seed",
        "unknown-task",
        "10kB",
    ],
)
def test_replay_of_a_file_that_is_not_a_schedules_payload_is_one_line(tmp_path, capsys, text, hint):
    path = tmp_path / "schedules.json"
    path.write_text(text)
    rc = main(["replay", str(path)])
    out, err = capsys.readouterr()
    assert out == ""
    assert hint in assert_one_line(rc, err, str(path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFO")
def test_replay_of_a_fifo_does_not_hang(tmp_path, capsys, deadline):
    path = tmp_path / "schedules.json"
    os.mkfifo(path)
    rc = main(["replay", str(path)])
    assert "not a regular file" in assert_one_line(rc, capsys.readouterr().err, str(path))


def test_replay_of_a_valid_payload_trains(tmp_path):
    from metaopt.pbt import replay

    path = tmp_path / "schedules.json"
    path.write_text(json.dumps(valid_payload()))
    payload = replay.load_payload(str(path), None)
    assert payload["experiment"]["pbt"]["seed"] == 0
    result = replay.replay(payload, progress=False)
    assert result.trial_id == "t1" and result.steps == 10


# -------------------------------------------------------------------------------------------- Ray addresses


@pytest.mark.parametrize(
    "address",
    ["auto", "local", "127.0.0.1:6379", "ray://head.example.com:10001", "[::1]:6379", "head-0.cluster.local:6379"],
)
def test_address_forms_that_are_accepted(address):
    assert config.from_dict({"name": "a", "kind": "pbt", "ray": {"address": address}}).ray.address == address


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_address_where_nothing_listens_fails_fast():
    ray = config.RayConfig()
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        config.check_ray_address(f"127.0.0.1:{port}", ray)
    assert caught.value.field == "--address" and "nothing answers" in caught.value.problem
    with pytest.raises(ConfigError) as caught:
        config.check_ray_address(None, config.RayConfig(address=f"ray://127.0.0.1:{port}"))
    assert caught.value.field == "ray.address"
    with pytest.raises(ConfigError, match="--address: must be auto, local"):
        config.check_ray_address("http://127.0.0.1:8265", ray)
    assert time.monotonic() - started < 10


def test_address_where_something_listens_passes():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        config.check_ray_address(f"127.0.0.1:{port}", config.RayConfig())
        config.check_ray_address(None, config.RayConfig(address=f"127.0.0.1:{port}"))
    config.check_ray_address(None, config.RayConfig())  # local: nothing to check
    config.check_ray_address("auto", config.RayConfig())


def test_metaopt_run_with_a_malformed_address_fails_before_ray_or_mlflow(tmp_path, monkeypatch, capsys):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text((REPO / "experiments" / "quickstart_tiny.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    rc = main(["run", str(experiment), "--address", "head.example.com"])
    out, err = capsys.readouterr()
    assert "HOST:PORT" in assert_one_line(rc, err, "--address") and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"], "a failed start left files behind"


def test_metaopt_run_where_nothing_listens_fails_before_ray_or_mlflow(tmp_path):
    """A subprocess, as the user runs it: ray.init would retry such an address for minutes."""
    experiment = tmp_path / "exp.yaml"
    experiment.write_text((REPO / "experiments" / "quickstart_tiny.yaml").read_text())
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "metaopt.cli", "run", str(experiment), "--address", f"127.0.0.1:{free_port()}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("metaopt: error: --address: ") and "nothing answers" in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"], "a failed start left files behind (mlflow.db?)"
    assert time.monotonic() - started < 120


# ------------------------------------------------------------------------------------- database tracking URIs


@pytest.mark.parametrize(
    "uri, module, package",
    [
        ("mysql://u:p@db.example:3306/mlflow", "MySQLdb", "mysqlclient"),
        ("postgresql+psycopg2://u:p@db.example/mlflow", "psycopg2", "psycopg2-binary"),
        ("mysql+pymysql://u:p@db.example/mlflow", "pymysql", "PyMySQL"),
    ],
)
def test_database_uri_without_its_driver_names_the_package(tmp_path, capsys, tripwire, uri, module, package):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**PBT, "tracking": {"uri": uri}}))
    rc = main(["run", str(path)])
    line = assert_one_line(rc, capsys.readouterr().err, "tracking.uri")
    assert f"pip install '{package}'" in line and uri.split("@")[0] not in line  # no password in the line
    assert config.load(path, check_paths=False).tracking.uri == uri  # submit: the cluster's drivers count


@pytest.mark.parametrize(
    "uri, hint",
    [
        ("postgresql+nosuchdriver://u:secret@h/db", "nosuchdriver"),
        ("postgresql://u:secret@h:port/db", "not a valid 'postgresql':// URI"),
    ],
    ids=["unknown-driver", "port-not-a-number"],
)
def test_database_uri_sqlalchemy_cannot_use(tmp_path, capsys, tripwire, uri, hint):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**PBT, "tracking": {"uri": uri}}))
    rc = main(["run", str(path)])
    line = assert_one_line(rc, capsys.readouterr().err, "tracking.uri")
    assert hint in line and "secret" not in line
