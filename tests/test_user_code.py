"""The user-code seam (metaopt.user_code): references to the researcher's own modules, each failure one line."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from metaopt import user_code
from metaopt.config import first_error
from metaopt.errors import ConfigError


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder outside the package holding the user's module ``my_code_<id>`` (a fresh name per test, so no
    module cached by an earlier test answers); sys.path and sys.modules are restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.delenv(user_code.USER_DIR_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_module(folder, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


def test_a_function_is_imported_from_the_users_directory(user_folder):
    write_module(user_folder, "uc_plain", "def make(options, seed):\n    return {'seed': seed, **options}\n")
    make = user_code.load_callable("uc_plain:make", ("options", "seed"))
    assert make({"a": 1}, 7) == {"seed": 7, "a": 1}
    assert sys.path[0] == str(user_folder)


def test_the_variable_names_the_directory_for_rays_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    write_module(tmp_path, "uc_worker", "VALUE = 41\n")
    monkeypatch.chdir(tmp_path.parent)  # a trial runs in a folder of its own
    monkeypatch.setenv(user_code.USER_DIR_VARIABLE, str(tmp_path))
    assert user_code.load("uc_worker:VALUE") == 41


def test_nested_attributes_and_packages(user_folder):
    package = user_folder / "uc_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_module(package, "tasks", "class Factory:\n    @staticmethod\n    def build(x):\n        return x + 1\n")
    assert user_code.load_callable("uc_pkg.tasks:Factory.build", ("x",))(1) == 2


@pytest.mark.parametrize(
    "reference, problem",
    [
        ("no_colon", "is not a 'module:function' reference"),
        ("a:b:c", "is not a 'module:function' reference"),
        ("1bad:make", "is not a 'module:function' reference"),
        ("uc_missing_module:make", "no module named 'uc_missing_module'"),
        ("uc_errors:absent", "uc_errors has no attribute 'absent'"),
        ("uc_errors:NOT_CALLABLE", "is a int, not a function taking (options, seed)"),
        ("uc_errors:one_argument", "must accept (options, seed); its signature is (options)"),
        ("uc_broken:make", "importing uc_broken raised RuntimeError: broken at import"),
        ("uc_needs:make", "importing uc_needs failed: ModuleNotFoundError: No module named 'not_installed_anywhere'"),
    ],
)
def test_each_failure_is_one_line(user_folder, reference, problem):
    write_module(user_folder, "uc_errors", "NOT_CALLABLE = 3\ndef one_argument(options):\n    return options\n")
    write_module(user_folder, "uc_broken", "raise RuntimeError('broken at import')\n")
    write_module(user_folder, "uc_needs", "import not_installed_anywhere\n")
    with pytest.raises(ConfigError) as caught:
        user_code.load_callable(reference, ("options", "seed"))
    message = str(caught.value)
    assert problem in message and "\n" not in message


def test_a_call_that_raises_or_returns_the_wrong_type_is_one_line(user_folder):
    write_module(user_folder, "uc_calls", "def bad(x):\n    raise KeyError('x')\ndef text(x):\n    return 'no'\n")
    bad = user_code.load_callable("uc_calls:bad", ("x",))
    with pytest.raises(ConfigError, match=r"^'uc_calls:bad' raised KeyError: 'x'$"):
        user_code.call(bad, "uc_calls:bad", 1)
    text = user_code.load_callable("uc_calls:text", ("x",))
    value = user_code.call(text, "uc_calls:text", 1)
    with pytest.raises(ConfigError, match=r"^'uc_calls:text' returned a str; expected a float$"):
        user_code.expect(value, "uc_calls:text", float, "a float")
    assert user_code.expect(2.0, "uc_calls:text", float, "a float") == 2.0


class _Section(BaseModel):
    reward: user_code.user_function("completion", "answer")  # type: ignore[valid-type]  # a field type built at run time


def _validate(value, **context):
    try:
        return _Section.model_validate({"reward": value}, context=context)
    except ValidationError as err:
        raise first_error("posttrain", _Section, err) from None


def test_a_field_imports_only_where_the_run_happens(user_folder):
    write_module(user_folder, "uc_reward", "def score(completion, answer):\n    return float(completion == answer)\n")
    assert _validate("uc_reward:score", base=str(user_folder), check_paths=True).reward == "uc_reward:score"
    # submit / list: the code is the cluster's (shipped with the job); only the form is checked here
    assert _validate("uc_elsewhere:score", check_paths=False).reward == "uc_elsewhere:score"
    with pytest.raises(ConfigError, match=r"^posttrain\.reward: 'uc_elsewhere:score': no module named"):
        _validate("uc_elsewhere:score", base=str(user_folder), check_paths=True)
    with pytest.raises(ConfigError, match=r"^posttrain\.reward: 'score' is not a 'module:function' reference"):
        _validate("score", check_paths=False)


def test_python_objects_become_references(user_folder):
    write_module(user_folder, "uc_named", "def make(x):\n    return x * 2\n")
    named = user_code.load("uc_named:make")
    assert user_code.reference_to(named) == "uc_named:make"
    assert user_code.reference_to("already:a_reference") == "already:a_reference"

    offset = 5

    def shifted(x):
        return x + offset

    local = user_code.reference_to(shifted)  # a closure: not importable by name, so by value
    assert local.startswith(user_code.PICKLE_PREFIX)
    assert user_code.load(local)(1) == 6
    assert user_code.reference_to(shifted) == local  # same content, same file: written once
    assert user_code.name_of(local) == "python-object" and user_code.name_of("a.b:make_task") == "make_task"


def test_a_pickle_reference_is_refused_from_a_file_and_accepted_from_python(user_folder):
    reference = user_code.reference_to(lambda completion, answer: 1.0)
    with pytest.raises(ConfigError, match="written by metaopt's Python API"):
        _validate(reference, base=str(user_folder), check_paths=True)
    assert _validate(reference, base=str(user_folder), check_paths=True, python_objects=True).reward == reference
    assert _Section.model_validate({"reward": reference}).reward == reference  # a trial rebuilding its section


def test_a_missing_pickle_is_one_line(user_folder):
    with pytest.raises(ConfigError, match="cannot read the Python object"):
        user_code.load(f"{user_code.PICKLE_PREFIX}{user_folder / 'gone.pkl'}")


# ---- the user's directory while their code runs, fresh modules, exits, objects by value ---------------------


def test_the_users_function_runs_in_the_users_directory(user_folder, monkeypatch):
    """Ray runs each trial in a folder of its own: a factory reading ``open("data.csv")`` reads the file beside the
    experiment there too, and the trial's own directory is back afterwards."""
    (user_folder / "data.csv").write_text("x\n1\n2\n")
    write_module(
        user_folder, "uc_reads", "def rows():\n    with open('data.csv') as f:\n        return len(f.readlines())\n"
    )
    trial_folder = user_folder / "trial_0"
    trial_folder.mkdir()
    monkeypatch.setenv(user_code.USER_DIR_VARIABLE, str(user_folder))
    monkeypatch.chdir(trial_folder)
    rows = user_code.load_callable("uc_reads:rows", ())
    assert user_code.call(rows, "uc_reads:rows") == 3
    assert Path.cwd() == trial_folder


def test_a_module_is_imported_again_when_its_file_or_the_users_directory_changed(user_folder, monkeypatch):
    write_module(user_folder, "uc_edited", "def make():\n    return {'oops': 1}\n")
    assert user_code.load("uc_edited:make")() == {"oops": 1}
    write_module(user_folder, "uc_edited", "def make():\n    return 'fixed, a longer file'\n")  # a notebook edit
    assert user_code.load("uc_edited:make")() == "fixed, a longer file"

    other = user_folder / "project_2"
    other.mkdir()
    write_module(other, "uc_edited", "raise RuntimeError('this is project 2')\n")
    monkeypatch.chdir(other)  # the same kernel, another project
    with pytest.raises(ConfigError, match=r"importing uc_edited raised RuntimeError: this is project 2"):
        user_code.load("uc_edited:make")
    assert str(user_folder) not in sys.path and sys.path[0] == str(other)


def test_a_module_or_function_that_exits_is_one_line(user_folder, capsys):
    write_module(user_folder, "uc_script", "import argparse\nargparse.ArgumentParser().parse_args(['--x'])\n")
    write_module(user_folder, "uc_exits", "import sys\ndef make():\n    sys.exit('no GPU found')\n")
    with pytest.raises(ConfigError) as caught:
        user_code.load("uc_script:make")
    message = str(caught.value)
    assert "importing uc_script exited (sys.exit(2); " in message and "error: unrecognized arguments: --x)" in message
    assert "\n" not in message and "if __name__ == '__main__'" in message
    assert capsys.readouterr().err == ""  # argparse's usage is in the line, not printed above it
    make = user_code.load("uc_exits:make")
    with pytest.raises(ConfigError, match=r"^'uc_exits:make' exited \(sys.exit: no GPU found\); raise an exception"):
        user_code.call(make, "uc_exits:make")


def test_a_function_workers_cannot_import_by_name_is_pickled_by_value(user_folder, tmp_path_factory):
    """A module found only through the notebook's own ``sys.path.append``: Ray's workers (which import from the
    user's directory) would not find it by name, so it travels by value."""
    elsewhere = tmp_path_factory.mktemp("notebook_lib")
    write_module(elsewhere, "uc_nb_lib", "FACTOR = 3\ndef triple(x):\n    return FACTOR * x\n")
    sys.path.append(str(elsewhere))
    notebook_lib = importlib.import_module("uc_nb_lib")

    reference = user_code.reference_to(notebook_lib.triple)
    assert reference.startswith(user_code.PICKLE_PREFIX)
    import cloudpickle

    assert "uc_nb_lib" not in cloudpickle.list_registry_pickle_by_value()  # registered only while pickling
    sys.path.remove(str(elsewhere))
    del sys.modules["uc_nb_lib"]  # a worker: the module cannot be imported
    assert user_code.load(reference)(2) == 6

    write_module(user_folder, "uc_in_user_dir", "def double(x):\n    return 2 * x\n")
    assert user_code.reference_to(user_code.load("uc_in_user_dir:double")) == "uc_in_user_dir:double"
    assert user_code.reference_to(textwrap.dedent) == "textwrap:dedent"  # installed: by name


def test_objects_are_written_whole_or_not_at_all(user_folder):
    path = user_code.objects_folder() / "abc.pkl"
    assert user_code.write_once(path, b"first") == path and path.read_bytes() == b"first"
    assert user_code.write_once(path, b"second") == path and path.read_bytes() == b"first"  # same name, same content
    assert sorted(p.name for p in path.parent.iterdir()) == ["abc.pkl"]  # no partial file left behind
    assert path.parent == user_folder / ".metaopt" / "objects"
