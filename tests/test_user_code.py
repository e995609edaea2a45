"""The user-code seam (metaopt.user_code): references to the researcher's own modules, each failure one line."""

from __future__ import annotations

import sys
import textwrap

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
