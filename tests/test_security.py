"""Security: model-written text is never evaluated, the embedded Ray listens on loopback only, secrets stay out
of job command lines, printed output and uploads."""

from __future__ import annotations

import builtins
import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from metaopt import jobs
from metaopt.errors import ConfigError
from metaopt.posttrain import arithmetic
from metaopt.posttrain.arithmetic import ExpressionError, evaluate, score_countdown
from metaopt.posttrain.tasks import GYM_LEVELS, make_taskset
from metaopt.redact import has_credentials, redact_config, redact_uri, strip_userinfo

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"


# ---------------------------------------------------------------------------------------------------------------
# 9. no model-written text is ever evaluated


def _countdown_candidates(entry: dict) -> list[str]:
    """reasoning-gym's own answer and wrong or malformed variants of it (for the oracle comparison)."""
    answer, numbers, target = entry["answer"], entry["metadata"]["numbers"], entry["metadata"]["target"]
    first = str(numbers[0])
    return [
        answer,
        answer.replace(" ", ""),
        f"({answer})",
        f"-(-({answer}))",
        answer + "+1",
        "-" + answer,
        answer.replace("+", "-", 1),
        answer.replace("*", "+", 1),
        answer.replace("/", "*", 1),
        answer + "*" + first,
        answer.replace(first, "0" + first, 1),
        str(target),
        "(" + answer,
        answer + ")",
        answer + "=",
        "x" + answer,
        "",
        "   ",
        answer + " " + first,
        answer.replace(first, first + ".0", 1),
    ]


def test_countdown_scorer_agrees_with_reasoning_gym_on_its_answers_and_on_wrong_ones():
    """Oracle: on 320 reasoning-gym countdown entries (our three levels and reasoning-gym's default config), our
    scorer gives full score exactly where reasoning-gym's does, for its own answers and for wrong/malformed ones."""
    import reasoning_gym

    configs = [GYM_LEVELS["countdown"][level] for level in (1, 2, 3)] + [{}]
    compared = correct = 0
    for index, config in enumerate(configs):
        dataset = reasoning_gym.create_dataset("countdown", size=80, seed=11 + index, **config)
        for entry in dataset:
            for candidate in _countdown_candidates(entry):
                theirs = dataset.score_answer(candidate, entry) >= 1.0
                ours = score_countdown(candidate, entry["metadata"]["numbers"], entry["metadata"]["target"])
                assert ours == float(theirs), (candidate, entry["metadata"])
                compared, correct = compared + 1, correct + theirs
            assert score_countdown(entry["answer"], entry["metadata"]["numbers"], entry["metadata"]["target"]) == 1.0
    assert compared == 320 * 20 and correct >= 320 * 3  # each entry's answer, spaceless and in parentheses


def test_countdown_scorer_is_stricter_than_reasoning_gym_where_sympy_or_floats_let_a_wrong_answer_through():
    """reasoning-gym accepts 7*(12**-12 + 24) for 168 from 7,12,12,24 (sympy takes ``**``; np.isclose takes the
    1e-13 error); the target must be reached exactly with + - * / only."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("countdown", size=1, seed=0)
    entry = {"answer": "", "metadata": {"numbers": [7, 12, 12, 24], "target": 168}}
    assert dataset.score_answer("7*(12**-12 + 24)", entry) == 1.0
    assert score_countdown("7*(12**-12 + 24)", [7, 12, 12, 24], 168) == 0.0
    assert score_countdown("7*(12/12 + 24) - 7", [7, 12, 12, 24, 7], 168) == 1.0


def test_evaluator_is_exact_and_follows_arithmetic_precedence():
    assert evaluate("1/3 + 1/3 + 1/3") == 1 and evaluate("2+3*4") == 14 and evaluate("(2+3)*4") == 20
    assert evaluate("7/2") == Fraction(7, 2) and evaluate("-(2-5)") == 3 and evaluate(" 8 - 2 - 1 ") == 5
    assert evaluate("24/4/2") == 3 and evaluate("+-3") == -3
    assert arithmetic.parse("19*2 - 19 + 2")[1] == [19, 2, 19, 2]


@pytest.mark.parametrize(
    "text",
    [
        "1/0",
        "5/(3-3)",
        "2**3",
        "2^3",
        "1.5",
        "1e3",
        "abs(3)",
        "3 4",
        "(3",
        "3)",
        "",
        "٣+1",
        "10" * 20,
        "99999999999999*99999999999999*99999999999999",
        "1/99999999999999/99999999999999/99999999999999",
    ],
)
def test_evaluator_rejects_everything_outside_its_bounded_grammar(text):
    with pytest.raises(ExpressionError):
        evaluate(text)


def test_evaluator_bounds_nesting_and_checks_a_wall_clock_budget():
    depth = arithmetic.MAX_DEPTH
    assert evaluate("(" * (depth - 1) + "1" + ")" * (depth - 1)) == 1
    with pytest.raises(ExpressionError, match="deeper"):
        evaluate("(" * depth + "1" + ")" * depth)
    with pytest.raises(ExpressionError, match="deeper"):
        evaluate("-" * depth + "1")
    with pytest.raises(ExpressionError, match="time budget"):  # an already spent budget stops at the first token
        evaluate("1+2", budget_s=-1.0)


def _countdown_taskset():
    return make_taskset([{"name": "countdown", "levels": [1, 2, 3]}], seed=0)


def test_hostile_completions_score_zero_quickly_and_run_nothing(tmp_path):
    """What sympy's parse_expr would run (a file would appear) or hang on is rejected in well under 0.1 s."""
    marker = tmp_path / "pwned"
    hostile = [
        "9**9**9**9",
        f"__import__('pathlib').Path({str(marker)!r}).touch()",
        f"__import__('os').system('touch {marker}')",
        "(lambda: 3)()",
        "1" * 1_000_000,
        "(" * 10_000 + "3" + ")" * 10_000,
        "(" * 100 + "3" + ")" * 100,
        "-" * 200 + "3",
        "9" * 200 + "*" + "9" * 50,
    ]
    taskset = _countdown_taskset()
    problem = taskset.sample("countdown/L3", np.random.default_rng(0))
    for text in hostile:
        start = time.perf_counter()
        assert taskset.reward(problem, text + "<eos>") == 0.0
        assert time.perf_counter() - start < 0.1, text[:40]
    assert not marker.exists()
    assert taskset.reward(problem, taskset.demonstration(problem) + "<eos>") == 1.0


def test_posttrain_scoring_never_calls_sympy_parse_expr_or_eval(monkeypatch):
    """Every reasoning-gym task metaopt uses, correct and wrong completions: no parse_expr, no eval."""
    import reasoning_gym.games.countdown as countdown_module
    import sympy.parsing.sympy_parser as sympy_parser

    taskset = make_taskset([{"name": name, "levels": list(GYM_LEVELS[name])} for name in GYM_LEVELS], seed=3)
    rng = np.random.default_rng(3)
    problems = [taskset.sample(category, rng) for category in taskset.categories for _ in range(5)]
    calls = []

    def forbidden(name):
        def record(*args, **kwargs):
            calls.append((name, str(args)[:80]))
            raise AssertionError(f"{name} called while scoring")

        return record

    monkeypatch.setattr(sympy_parser, "parse_expr", forbidden("sympy parse_expr"))
    monkeypatch.setattr(countdown_module, "parse_expr", forbidden("countdown parse_expr"))
    monkeypatch.setattr(builtins, "eval", forbidden("eval"))
    rewards = [taskset.reward(p, taskset.demonstration(p) + "<eos>") for p in problems]
    wrong = [taskset.reward(p, taskset.demonstration(p) + "+1<eos>") for p in problems]
    monkeypatch.undo()
    assert calls == []
    assert rewards == [1.0] * len(problems) and wrong == [0.0] * len(problems)


# ---------------------------------------------------------------------------------------------------------------
# 10. nothing listens beyond loopback unless asked

_LISTENERS_SCRIPT = textwrap.dedent(
    """
    import json, os, psutil, ray
    from metaopt import runtime
    from metaopt.config import RayConfig

    runtime.init(RayConfig(num_cpus=1))  # as `metaopt run` starts its local Ray

    @ray.remote
    class Echo:
        def pid(self):
            return os.getpid()

    actor = Echo.remote()
    ray.get(actor.pid.remote())
    me = psutil.Process()
    found = []
    for process in [me] + me.children(recursive=True):
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append([process.name(), conn.laddr.ip, conn.laddr.port])
        except psutil.Error:
            pass
    print("LISTENERS " + json.dumps(found))
    ray.shutdown()
    """
)


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def test_local_ray_listens_only_on_loopback():
    """Every listening TCP socket of the embedded Ray (driver, GCS, raylet, agents, workers) is on loopback."""
    env = {**os.environ, "PYTHONPATH": f"{PLATFORM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", _LISTENERS_SCRIPT], env=env, capture_output=True, text=True, timeout=180
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("LISTENERS ")), None)
    assert line, done.stdout[-2000:] + done.stderr[-3000:]
    listeners = json.loads(line.removeprefix("LISTENERS "))
    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners
    exposed = [entry for entry in listeners if not _is_loopback(entry[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_token_sent_over_plain_http_to_another_machine_is_warned_about():
    warning = jobs.cleartext_token_warning("http://10.0.0.5:8265", sends_token=True)
    assert warning and "clear text" in warning and "10.0.0.5" in warning and "ray dashboard" in warning
    assert jobs.cleartext_token_warning("10.0.0.5:8265", sends_token=True)  # scheme-less means http
    assert jobs.cleartext_token_warning("https://10.0.0.5:8265", sends_token=True) is None
    assert jobs.cleartext_token_warning("http://127.0.0.1:8265", sends_token=True) is None
    assert jobs.cleartext_token_warning("http://localhost:8265", sends_token=True) is None
    assert jobs.cleartext_token_warning("http://[::1]:8265", sends_token=True) is None
    assert jobs.cleartext_token_warning("http://10.0.0.5:8265", sends_token=False) is None


def test_cli_prints_the_cleartext_token_warning_on_stderr(monkeypatch, capsys):
    from metaopt import cli

    monkeypatch.setenv(jobs.AUTH_MODE_ENV, "token")
    # 0.0.0.0 is not a loopback name, and nothing answers there: the warning comes before the connection error.
    assert cli.main(["status", "raysubmit_x", "--address", "http://0.0.0.0:1"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "metaopt: warning: sending the Ray auth token in clear text" in err and "metaopt: error:" in err


# ---------------------------------------------------------------------------------------------------------------
# 11. secrets stay out of logs, command lines and uploads


@pytest.mark.parametrize(
    ("uri", "redacted"),
    [
        ("http://alice:s3cret@mlflow:5000/x", "http://***@mlflow:5000/x"),
        ("https://token@mlflow.example.com", "https://***@mlflow.example.com"),
        ("http://alice:p@ss@mlflow:5000", "http://***@mlflow:5000"),  # unescaped "@" in the password
        ("postgresql://alice:a/b@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),  # "/" in the password
        ("mysql+pymysql://alice:p%40ss@db/mlflow", "mysql+pymysql://***@db/mlflow"),
        ("http://mlflow:5000/x?owner=a@b", "http://mlflow:5000/x?owner=a@b"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("databricks://profile", "databricks://profile"),
        ("not a uri: a@b", "not a uri: a@b"),
    ],
)
def test_redact_uri_hides_userinfo_and_nothing_else(uri, redacted):
    assert redact_uri(uri) == redacted
    assert has_credentials(uri) == (uri != redacted)
    assert strip_userinfo(uri) == redacted.replace("***@", "")


def test_redact_config_walks_a_nested_config_without_changing_it():
    config = {
        "name": "x",
        "seed": 3,
        "tracking": {"uri": "http://alice:s3cret@mlflow:5000", "experiment": "e"},
        "extra": [{"db": "postgresql://bob:hunter2@db/m"}, ("sqlite:///m.db", 1.5)],
    }
    redacted = redact_config(config)
    assert redacted == {
        "name": "x",
        "seed": 3,
        "tracking": {"uri": "http://***@mlflow:5000", "experiment": "e"},
        "extra": [{"db": "postgresql://***@db/m"}, ("sqlite:///m.db", 1.5)],
    }
    assert "s3cret" not in json.dumps(redacted) and "hunter2" not in json.dumps(redacted)
    assert config["tracking"]["uri"] == "http://alice:s3cret@mlflow:5000"


def test_credentials_travel_in_the_job_environment_not_its_command_line(tmp_path):
    overrides = [
        "pbt.population=4",
        "tracking.uri=http://alice:p%40ss%2Fword@mlflow:5000",
        "extra.db=postgresql://bob:hunter 2$x@db/m",
    ]
    public, env_vars = jobs.keep_credentials_off_the_command_line(overrides)
    command = jobs.run_command("experiments/x.yaml", public)
    assert "alice" not in command and "p%40ss" not in command and "hunter" not in command and "bob" not in command
    assert env_vars[jobs.MLFLOW_USERNAME_ENV] == "alice" and env_vars[jobs.MLFLOW_PASSWORD_ENV] == "p@ss/word"
    assert jobs.runtime_env(tmp_path, env_vars=env_vars)["env_vars"] == {
        "RAY_JOB_STOP_WAIT_TIME_S": str(jobs.JOB_STOP_WAIT_S),
        **env_vars,
    }
    # Ray runs the entrypoint with a shell: the job's process gets the real values, one argument each.
    arguments = command.split(" run ", 1)[1]
    shell = subprocess.run(
        ["sh", "-c", f'for word in {arguments}; do printf "%s\\n" "$word"; done'],
        env={**os.environ, **env_vars},
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout.splitlines() == [
        "experiments/x.yaml",
        "--set",
        "pbt.population=4",
        "--set",
        "tracking.uri=http://mlflow:5000",
        "--set",
        "extra.db=postgresql://bob:hunter 2$x@db/m",
    ]


def test_submit_refuses_to_upload_the_filesystem_root_or_the_home_directory(tmp_path, monkeypatch, capsys):
    from metaopt import cli

    with pytest.raises(ConfigError, match="refusing to upload"):
        jobs.submit("/etc/hostname", "http://127.0.0.1:1", working_dir="/")
    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    (home / "project" / "x.yaml").write_text("name: x\n")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ConfigError, match="refusing to upload") as err:
        jobs.submit(str(home / "project" / "x.yaml"), "http://127.0.0.1:1", working_dir="~")
    assert err.value.field == "working_dir"
    monkeypatch.chdir(REPO)
    argv = ["submit", "experiments/quickstart_tiny.yaml", "--address", "http://127.0.0.1:1", "--working-dir", "/"]
    code = cli.main(argv)
    assert code == cli.EXIT_USAGE and "metaopt: error: working_dir: refusing to upload" in capsys.readouterr().err


def test_upload_leaves_out_keys_credentials_vcs_and_local_tracking_stores(tmp_path):
    """The archive Ray's own packaging builds from runtime_env: only the project's files go."""
    from ray._private.runtime_env.packaging import _zip_files

    root = tmp_path / "project"
    files = [
        "train.py",
        "experiments/x.yaml",
        "data/[set]/keep.csv",
        ".git/config",
        ".ssh/id_ed25519",
        ".aws/credentials",
        ".env",
        "server.pem",
        "certs/ca.pem",
        ".ray/auth_token",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/model.pt",
        "stores/[x]/runs.db",
        "stores/[x]/runs.db-wal",
        "sub/.env",
    ]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    tracking_uri = f"sqlite:///{root}/stores/[x]/runs.db"
    env = jobs.runtime_env(root, tracking_uri=tracking_uri)
    archive = tmp_path / "upload.zip"
    _zip_files(str(root), env["excludes"], str(archive), include_gitignore=False)
    with zipfile.ZipFile(archive) as zipped:
        uploaded = {name for name in zipped.namelist() if not name.endswith("/")}
    assert uploaded == {"train.py", "experiments/x.yaml", "data/[set]/keep.csv"}
    # A store elsewhere, or a server, adds nothing.
    assert jobs.runtime_env(root, tracking_uri="sqlite:////elsewhere/m.db")["excludes"] == jobs.EXCLUDES
    assert jobs.runtime_env(root, tracking_uri="http://mlflow:5000")["excludes"] == jobs.EXCLUDES


def test_redact_text_hides_credentials_anywhere_in_a_message_even_with_slashes_or_at_signs():
    from metaopt.redact import redact_text

    message = (
        "API request to http://alice:s3cret@127.0.0.1:9/api failed; db postgresql://u:pa/ss@db/x; "
        "odd http://u:p@ss@host/x; quoted 'https://tok@b/c'"
    )
    redacted = redact_text(message)
    assert not any(secret in redacted for secret in ("s3cret", "pa/ss", "p@ss", "tok@"))
    assert "http://***@127.0.0.1:9/api" in redacted and "postgresql://***@db/x" in redacted


def test_loopback_switch_falls_back_to_rays_default_when_a_release_drops_it(monkeypatch, capsys):
    from ray._private import ray_constants

    from metaopt.runtime import loopback_only

    monkeypatch.delattr(ray_constants, "ENABLE_RAY_CLUSTER")
    entered = False
    with loopback_only():
        entered = True
    assert entered and "no single-node switch" in capsys.readouterr().err
