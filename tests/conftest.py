"""Shared fixtures: one local Ray per test session, a real MLflow server on 127.0.0.1, tiny experiments."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from ray.tune import Callback

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"

# Derived copies of packaged data (metaopt.tasks.datasets) go to a directory of this test session, not the
# user's home; set before any Ray starts, so its worker processes inherit it.
os.environ.setdefault("METAOPT_CACHE_DIR", tempfile.mkdtemp(prefix="metaopt-cache-"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for every test that needs it (Ray start-up costs seconds; do it once)."""
    import ray

    from metaopt.config import RayConfig
    from metaopt.runtime import start_local

    if not ray.is_initialized():  # as `metaopt run` starts its local Ray: on loopback only
        start_local(RayConfig(num_cpus=2), log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 with its own sqlite store and artifact root."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server_log = open(root / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'store.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=server_log,
        cwd=root,
        env={**os.environ, "MLFLOW_SERVER_ALLOWED_HOSTS": "*"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
    else:
        process.kill()
        raise RuntimeError("mlflow server did not answer /health within 90 s")
    yield uri
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    server_log.close()


@pytest.fixture
def tiny(tmp_path):
    """Load experiments/quickstart_tiny.yaml with overrides, storing Tune results and MLflow under tmp_path."""
    from metaopt import config

    def load(*overrides: str, uri: str | None = None, name: str | None = None):
        """``uri="default"`` keeps the file's default tracking URI (sqlite:///mlflow.db in the cwd)."""
        base = [f"ray.storage_path={tmp_path / 'ray_results'}"]
        if uri != "default":
            base.append(f"tracking.uri={uri or 'sqlite:///' + str(tmp_path / 'mlflow.db')}")
        if name:
            base.append(f"name={name}")
        return config.load(EXPERIMENTS / "quickstart_tiny.yaml", [*base, *overrides])

    return load


class KillTrialProcess(Callback):
    """Kills the worker process of the first trial once it reports ``at_iteration`` (a real crash); ``when``
    (trial -> bool) picks which trial, e.g. one PBT has just made exploit another."""

    def __init__(self, at_iteration: int, when=None):
        self.at_iteration = at_iteration
        self.when = when
        self.killed: dict[str, int] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed or result["training_iteration"] != self.at_iteration:
            return
        if self.when is None or self.when(trial):
            self.killed[trial.trial_id] = result["pid"]
            os.kill(result["pid"], signal.SIGKILL)


def assert_runs_finished(uri: str, experiment_name: str, at_least: int) -> None:
    """Every MLflow run of the experiment -- sweep parents and trial children -- ended FINISHED (none left
    RUNNING, none FAILED): what a sweep that recovered from a crashed trial must leave behind."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no MLflow experiment {experiment_name!r}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    statuses = {f"{r.data.tags.get('metaopt.role')}:{r.info.run_name}": r.info.status for r in runs}
    assert len(runs) >= at_least and set(statuses.values()) == {"FINISHED"}, statuses


def run_metaopt_from(folder, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``metaopt run <args>`` in a fresh interpreter from ``folder``, as a user runs it from their own project
    (no METAOPT_USER_DIR inherited from the test process); asserts exit 0 and no traceback, showing the output's
    tail otherwise."""
    env = {key: value for key, value in os.environ.items() if key != "METAOPT_USER_DIR"}
    result = subprocess.run(
        [sys.executable, "-m", "metaopt.cli", "run", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result
