"""Ray Jobs adapter against a REAL local cluster started with ``ray start --head``, plus the cluster files.

The module fixture starts its own head node (own ``--temp-dir``, free ports, never 6379/8265) so it can run
beside the in-process ``ray.init`` clusters of other tests, and stops only its own processes afterwards.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from metaopt import jobs
from metaopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------------------------
# the cluster fixture


def _free_ports(count: int) -> list[int]:
    """Ports free right now on all interfaces (held open together so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ray_executable() -> str:
    """The ``ray`` CLI of the interpreter running the tests (not whatever is first on PATH)."""
    candidate = BIN / "ray"
    return str(candidate) if candidate.exists() else shutil.which("ray")


def _cluster_env() -> dict[str, str]:
    """The environment of a user's shell: this venv first on PATH, so job entrypoints find its python."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)  # a leftover address would make `ray start` join another cluster
    return env


def _ensure_token(env: dict[str, str]) -> None:
    """Create ~/.ray/auth_token if absent, as every Ray >= 2.59 ``ray.init`` does, so the head runs in token mode.

    With a token present and RAY_AUTH_MODE unset, ``ray start --head`` enables token auth: the case a user
    hits after any local ``ray.init``, and the one the client side has to handle.
    """
    if env.get(jobs.AUTH_MODE_ENV, "").lower() == "disabled":
        return
    subprocess.run([_ray_executable(), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)


def _start_head(temp_dir: str, env: dict[str, str], log) -> tuple[subprocess.Popen, int]:
    """``ray start --head --block`` in its own session; returns the process and the dashboard port.

    ``--block`` keeps the command alive as the parent of every process it starts: SIGTERM to it shuts down
    exactly this cluster (unlike ``ray stop``, which kills every Ray process on the machine).
    """
    gcs, dashboard, client, agent_http, agent_grpc, env_agent, metrics = _free_ports(7)
    command = [
        _ray_executable(),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--object-store-memory={300 * 1024**2}",
        f"--temp-dir={temp_dir}",
    ]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, dashboard


def _wait_for_jobs_api(address: str, proc: subprocess.Popen, log_path: Path) -> None:
    """Block until the Jobs API answers (401 counts: the server is up, it just wants the token)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{address}/api/jobs/", timeout=2).status_code in (200, 401):
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"Ray Jobs API at {address} did not come up in {START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")


def _stop_unfinished_jobs(address: str) -> None:
    """Stop jobs still running: their entrypoints live in their own sessions, outside the head's process tree."""
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        for job in client.list_jobs():
            if str(getattr(job.status, "value", job.status)) not in jobs.TERMINAL_STATUSES:
                client.stop_job(job.submission_id)
    except Exception:  # teardown is best effort; the process sweep below still runs
        pass


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the blocking ``ray start`` (it drains and kills its children), then sweep stragglers.

    Stragglers are found by session id (everything the head started without a new session) or by our
    temp dir in the command line; no other Ray on the machine matches either.
    """
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for leftover in psutil.process_iter(["pid", "cmdline"]):
        try:
            ours = os.getsid(leftover.pid) == proc.pid or temp_dir in " ".join(leftover.info["cmdline"] or ())
            if ours and leftover.pid != os.getpid():
                leftover.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Address (``http://127.0.0.1:PORT``) of a fresh single-node Ray cluster with the Jobs API up."""
    env = _cluster_env()
    _ensure_token(env)
    # Short path under /tmp: Ray's unix socket paths inside the temp dir must stay under ~107 chars.
    temp_dir = tempfile.mkdtemp(prefix="mo-ray-", dir="/tmp")
    log_path = tmp_path_factory.mktemp("ray-head") / "ray_start.log"
    with open(log_path, "w") as log:
        proc, dashboard_port = _start_head(temp_dir, env, log)
        address = f"http://127.0.0.1:{dashboard_port}"
        try:
            _wait_for_jobs_api(address, proc, log_path)
            yield address
        finally:
            _stop_unfinished_jobs(address)
            _stop_head(proc, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def job_dir(tmp_path) -> Path:
    """A small working dir to upload, with a marker file the job prints (proves the upload happened)."""
    (tmp_path / "marker.txt").write_text("marker-content-42\n")
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# jobs against the real cluster


def test_job_succeeds_and_its_output_reaches_logs(cluster, job_dir):
    job_id = jobs.submit_command("echo hello-from-job; sleep 1; cat marker.txt", cluster, working_dir=str(job_dir))
    followed = io.StringIO()
    assert jobs.logs(job_id, cluster, follow=True, out=followed) == "SUCCEEDED"  # returns once the job ends
    assert "hello-from-job" in followed.getvalue() and "marker-content-42" in followed.getvalue()
    assert jobs.status(job_id, cluster) == "SUCCEEDED"
    snapshot = io.StringIO()
    jobs.logs(job_id, cluster, follow=False, out=snapshot)
    assert "hello-from-job" in snapshot.getvalue()


def test_failing_job_reports_failed(cluster, job_dir):
    job_id = jobs.submit_command("echo about-to-fail; exit 3", cluster, working_dir=str(job_dir))
    assert jobs.wait(job_id, cluster, timeout_s=JOB_TIMEOUT_S, poll_s=0.5) == "FAILED"


def test_unknown_job_id_is_a_job_error(cluster):
    with pytest.raises(ConfigError) as err:
        jobs.status("raysubmit_doesnotexist", cluster)
    assert err.value.field == "JOB" and "raysubmit_doesnotexist" in str(err.value)


def test_submit_of_experiment_file_runs_metaopt_from_the_working_dir(cluster, job_dir):
    # The CLI may not exist yet; the job's log shows the exact command it ran either way.
    (job_dir / "experiments").mkdir()
    (job_dir / "experiments" / "x.yaml").write_text("name: x\n")
    job_id = jobs.submit(str(job_dir / "experiments" / "x.yaml"), cluster, ["a.b=1 2"], working_dir=str(job_dir))
    jobs.wait(job_id, cluster, timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
    text = io.StringIO()
    jobs.logs(job_id, cluster, out=text)
    assert "python -m metaopt.cli run experiments/x.yaml --set 'a.b=1 2'" in text.getvalue()


def _client_script(address: str) -> str:
    """A tiny program calling jobs.status in a fresh interpreter (auth mode is read once per process)."""
    return (
        "from metaopt import jobs\nfrom metaopt.errors import ConfigError\n"
        f"try:\n    print('STATUS', jobs.status('raysubmit_doesnotexist', {address!r}))\n"
        "except ConfigError as err:\n    print('ERROR', err.field, '|', err)\n"
    )


def _run_client(address: str, **env_changes) -> str:
    """Run :func:`_client_script` with ``env_changes`` (None deletes a variable); return its stdout."""
    env = {**os.environ, "PYTHONPATH": f"{PLATFORM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    command = [sys.executable, "-c", _client_script(address)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    return done.stdout


def test_token_auth_works_with_auth_mode_unset(cluster):
    if requests.get(f"{cluster}/api/jobs/", timeout=5).status_code != 401:
        pytest.skip("the test cluster runs without token auth (RAY_AUTH_MODE=disabled in this environment)")
    # A user's shell after `ray start --head`: token file present, RAY_AUTH_MODE unset. Reaching the
    # job lookup (a JOB error, not an --address one) proves the token was sent and accepted.
    assert "ERROR JOB |" in _run_client(cluster, RAY_AUTH_MODE=None)
    # Explicitly disabled: the server demands a token and the user gets one line saying so.
    refused = _run_client(cluster, RAY_AUTH_MODE="disabled")
    assert "ERROR --address |" in refused and "requires a token" in refused and len(refused.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# errors that need no cluster


def test_nothing_listening_is_one_line_address_error():
    (port,) = _free_ports(1)
    with pytest.raises(ConfigError) as err:
        jobs.status("raysubmit_x", f"http://127.0.0.1:{port}")
    assert err.value.field == "--address"
    assert "cannot reach Ray Jobs API" in str(err.value) and "ray start --head" in str(err.value)
    assert "\n" not in str(err.value)


def test_file_outside_working_dir_is_rejected(tmp_path):
    inside, outside = tmp_path / "project", tmp_path / "elsewhere.yaml"
    inside.mkdir()
    outside.write_text("name: x\n")
    with pytest.raises(ConfigError, match="outside the working dir"):
        jobs.submit(str(outside), "http://127.0.0.1:1", [], working_dir=str(inside))
    with pytest.raises(ConfigError, match="file not found"):
        jobs.submit(str(inside / "missing.yaml"), "http://127.0.0.1:1", [], working_dir=str(inside))


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError) as err:
        jobs.run_command("experiments/x.yaml", ["no-equals-sign"])
    assert err.value.field == "--set"


def test_run_command_quotes_every_argument():
    command = jobs.run_command("experiments/my exp.yaml", ["tracking.uri=sqlite:////tmp/a b.db", "x=$(rm -rf /)"])
    assert shlex.split(command) == [
        "python",
        "-m",
        "metaopt.cli",
        "run",
        "experiments/my exp.yaml",
        "--set",
        "tracking.uri=sqlite:////tmp/a b.db",
        "--set",
        "x=$(rm -rf /)",
    ]


def test_runtime_env_uploads_working_dir_and_package_without_local_state(tmp_path):
    env = jobs.runtime_env(tmp_path)
    assert env["working_dir"] == str(tmp_path)
    assert Path(env["py_modules"][0]) == Path(jobs.__file__).resolve().parent
    assert {".venv", ".git", "mlruns", "mlflow.db", "*.egg-info", "__pycache__"} <= set(env["excludes"])


def test_relative_sqlite_uri_becomes_absolute_for_a_local_head(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri, warning = jobs.resolve_tracking_uri_for_cluster("sqlite:///mlflow.db", "http://127.0.0.1:8265")
    assert (uri, warning) == (f"sqlite:///{tmp_path}/mlflow.db", None)
    nested, _ = jobs.resolve_tracking_uri_for_cluster("sqlite:///runs/m.db", "localhost:8265")
    assert nested == f"sqlite:///{tmp_path}/runs/m.db"
    absolute = f"sqlite:///{tmp_path}/x.db"
    assert jobs.resolve_tracking_uri_for_cluster(absolute, "http://127.0.0.1:8265") == (absolute, None)


def test_local_store_on_a_remote_head_is_kept_with_a_warning():
    uri, warning = jobs.resolve_tracking_uri_for_cluster("sqlite:///mlflow.db", "http://10.0.0.5:8265")
    assert uri == "sqlite:///mlflow.db" and "MLflow server" in warning
    server = "http://mlflow.internal:5000"
    assert jobs.resolve_tracking_uri_for_cluster(server, "http://10.0.0.5:8265") == (server, None)


# ---------------------------------------------------------------------------------------------------------------
# cluster launcher config and image


def test_cluster_yaml_is_a_valid_launcher_config_with_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does: merge provider defaults, check the schema
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    workers = [spec for name, spec in node_types.items() if name != config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert any(w["resources"].get("GPU", 0) >= 1 and w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers)
    assert config["cluster_name"] == "metaopt" and config["docker"]["image"]


def test_cluster_yaml_keeps_the_dashboard_on_the_heads_loopback():
    """The Jobs API (and the token it checks) is reached through `ray dashboard cluster.yaml`'s SSH tunnel only."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "ray dashboard cluster.yaml" in (REPO / "cluster.yaml").read_text()
    assert {".git", ".env", "*.pem", "mlflow.db", "mlruns"} <= set(config["rsync_exclude"])


def test_dockerfile_builds_on_a_ray_gpu_image_and_installs_the_package():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"rayproject/ray:[\d.]+-py311-(gpu|cu\d+)", text)
    assert ".[all,gpu]" in text and "WORKDIR /home/ray/metaopt" in text
    # the image installs the versions the tests ran with: the lock file is copied before the install reads it
    assert text.index("constraints.txt ./") < text.index("-c constraints.txt")


# ---------------------------------------------------------------------------------------------------------------
# end to end: `metaopt submit` of the tiny quickstart, tracked in MLflow


def _metaopt_command() -> list[str]:
    """The installed console script if present, else the module (works with PYTHONPATH=platform)."""
    script = BIN / "metaopt"
    return [str(script)] if script.exists() else [sys.executable, "-m", "metaopt.cli"]


def _cli(*args: str, timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run the CLI from ``cwd`` (the repo root) as a user would (RAY_AUTH_MODE unset: the token file must suffice)."""
    env = {**os.environ, "PYTHONPATH": f"{PLATFORM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_AUTH_MODE", None)
    command = [*_metaopt_command(), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _wait_via_cli(job_id: str, address: str) -> str:
    """Poll ``metaopt status`` until it prints a terminal status; return that status."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = _cli("status", job_id, "--address", address, timeout=60)
        found = re.search(r"\b(SUCCEEDED|FAILED|STOPPED)\b", done.stdout)
        if found:
            return found.group(1)
        time.sleep(2)
    pytest.fail(f"job {job_id} did not finish in 300s")


@pytest.mark.cluster
def test_metaopt_submit_ships_the_users_code_and_records_a_finished_mlflow_run(cluster, tmp_path):
    """A user's project folder (examples/own_task: their task module and data beside the experiment file), submitted
    from that folder as the README says: the job imports ``tasks:make_task`` from the uploaded working directory
    on the cluster and its MLflow runs end FINISHED with the user's metric."""
    from mlflow import MlflowClient

    project = tmp_path / "project"
    shutil.copytree(REPO / "examples" / "own_task", project, ignore=shutil.ignore_patterns("__pycache__", "mlruns"))
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    tiny = ["pbt.population=2", "pbt.iterations=2", "pbt.steps_per_iteration=10", "pbt.perturbation_interval=1"]
    overrides = [arg for override in [*tiny, f"tracking.uri={tracking_uri}"] for arg in ("--set", override)]
    submitted = _cli("submit", "pbt.yaml", "--address", cluster, *overrides, cwd=project)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    final = _wait_via_cli(job_id, cluster)
    assert final == "SUCCEEDED", _cli("logs", job_id, "--address", cluster).stdout[-4000:]

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("own-task-pbt")
    assert experiment is not None, f"no MLflow experiment 'own-task-pbt' in {tracking_uri}"
    runs = client.search_runs([experiment.experiment_id])
    assert runs and {run.info.status for run in runs} == {"FINISHED"}
    assert any("best_val_mse" in run.data.metrics for run in runs)  # scored by the user's own metric


@pytest.mark.cluster
def test_ray_job_stop_of_a_submitted_sweep_leaves_every_mlflow_run_killed(cluster, tmp_path):
    """`ray job stop` sends SIGTERM: the sweep stops its trials and ends its runs KILLED before Ray's SIGKILL."""
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    submitted = _cli(
        "submit",
        "experiments/quickstart_tiny.yaml",
        "--address",
        cluster,
        "--set",
        f"tracking.uri={tracking_uri}",
        "--set",
        "pbt.iterations=400",
        "--set",
        "pbt.steps_per_iteration=10",
        "--set",
        "pbt.synch=false",
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    deadline = time.monotonic() + 240
    while "iter   2/400" not in (log := _cli("logs", job_id, "--address", cluster).stdout):  # trials are training
        assert time.monotonic() < deadline and jobs.status(job_id, cluster) in ("PENDING", "RUNNING"), log[-3000:]
        time.sleep(2)
    assert jobs.stop(job_id, cluster)
    assert jobs.wait(job_id, cluster, timeout_s=120, poll_s=1) in ("STOPPED", "FAILED")
    log = _cli("logs", job_id, "--address", cluster).stdout
    assert "stopped by SIGTERM" in log and "PARTIAL" in log, log[-3000:]
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("quickstart-tiny")
    runs = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 3 and set(runs.values()) == {"KILLED"}, runs


# ---------------------------------------------------------------------------------------------------------------
# the user's own code on a cluster (no cluster needed)


def test_a_driver_joining_a_cluster_gives_its_workers_the_users_code(tmp_path, monkeypatch):
    """``metaopt run --address``: a cluster on this machine reads the user's directory by its path; any other
    gets it uploaded as the job's working_dir (minus what submit leaves out, the Python API's objects included);
    inside a submitted job the job's own working directory serves."""
    from metaopt import runtime, user_code

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert runtime.user_dir_runtime_env("127.0.0.1:6379") == {
        "runtime_env": {"env_vars": {user_code.USER_DIR_VARIABLE: str(tmp_path)}}
    }
    remote = runtime.user_dir_runtime_env("ray://10.1.2.3:10001")["runtime_env"]
    assert remote["working_dir"] == str(tmp_path) and ".metaopt" in remote["excludes"] and ".git" in remote["excludes"]
    assert "env_vars" not in remote  # the path would not exist there; workers start in their copy
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert runtime.user_dir_runtime_env("10.1.2.3:6379") == {}


def test_the_local_rays_workers_get_the_directory_it_started_in_and_this_process_keeps_its_own(tmp_path, monkeypatch):
    from metaopt import runtime, user_code

    monkeypatch.delenv(user_code.USER_DIR_VARIABLE, raising=False)
    with runtime.workers_user_dir(str(tmp_path)):
        assert os.environ[user_code.USER_DIR_VARIABLE] == str(tmp_path)  # what the raylet, and its workers, inherit
    assert user_code.USER_DIR_VARIABLE not in os.environ  # a notebook that moves on imports from where it is


def test_an_experiment_naming_python_api_objects_is_not_submitted(tmp_path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("name: x\nkind: federated\nfederated: {dataset: .metaopt/objects/0123abcd.npz}\n")
    with pytest.raises(ConfigError, match=r"^exp.yaml: in-memory Python objects cannot be submitted; name a module"):
        jobs.submit(str(experiment), "http://127.0.0.1:1", working_dir=str(tmp_path))
    experiment.write_text("name: x\nkind: pbt\n")
    with pytest.raises(ConfigError, match="in-memory Python objects cannot be submitted"):
        jobs.submit(str(experiment), "http://127.0.0.1:1", ["pbt.task=pickle:/tmp/a.pkl"], working_dir=str(tmp_path))
