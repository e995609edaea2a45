"""A sweep's end never lies: stopped sweeps are KILLED and exit 128 + signal, failed ones FAILED and non-zero, no
MLflow run is left RUNNING, MLflow trouble mid-sweep is retried and then given up without ending training, and two
sweeps started in the same second keep apart."""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from conftest import EXPERIMENTS, KillTrialProcess
from metaopt import session as session_mod
from metaopt.errors import ConfigError

METAOPT = Path(sys.executable).parent / "metaopt"


def statuses(uri: str, experiment: str) -> dict[str, str]:
    """run name -> status of every run of ``experiment`` in the store."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {uri}"
    return {r.info.run_name: r.info.status for r in client.search_runs([found.experiment_id])}


def tiny_args(tmp_path: Path, *overrides: str) -> list[str]:
    sets = [
        f"ray.storage_path={tmp_path / 'ray_results'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "ray.num_cpus=2",
        *overrides,
    ]
    return [str(EXPERIMENTS / "quickstart_tiny.yaml"), *[a for s in sets for a in ("--set", s)]]


# --- our exceptions cross Ray --------------------------------------------------------------------------------


def test_config_error_pickles_with_its_field_and_problem():
    err = pickle.loads(pickle.dumps(ConfigError("pbt.seed", "must be >= 0 (got -1)")))
    assert (err.field, err.problem, str(err)) == (
        "pbt.seed",
        "must be >= 0 (got -1)",
        "pbt.seed: must be >= 0 (got -1)",
    )


def test_a_config_error_raised_in_a_trial_reaches_the_summary_as_its_own_line(ray_session, tmp_path):
    from ray import tune

    def trainable(config):
        raise ConfigError("federated.data_root", "no such folder 'data/x'")

    results = tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    end = session_mod.trial_end(results[0])
    assert end.error == "federated.data_root: no such folder 'data/x'"
    assert end.iterations == 0


# --- outcome rules -------------------------------------------------------------------------------------------


def test_outcome_status_and_exit_code():
    done = session_mod.TrialEnd("a", 4, False, None)
    early_done = session_mod.TrialEnd("b", 2, True, None)  # a fixed-lr baseline stopping a diverged trial
    cut = session_mod.TrialEnd("c", 2, False, None)
    failed = session_mod.TrialEnd("d", 1, False, "ValueError: boom")
    Outcome = session_mod.SweepOutcome
    assert (Outcome((done, early_done), 4).status, Outcome((done, early_done), 4).exit_code) == ("FINISHED", 0)
    assert (Outcome((done, failed), 4).status, Outcome((done, failed), 4).exit_code) == ("FAILED", 1)
    assert (Outcome((done, cut), 4).status, Outcome((done, cut), 4).exit_code) == ("KILLED", 130)
    assert Outcome((done,), 4, stop_signal=signal.SIGTERM).exit_code == 143


# --- a real signal to a real `metaopt run` ---------------------------------------------------------------------


# SIGTERM takes the same path, through `ray job stop`: tests/test_jobs.py::test_ray_job_stop_of_a_submitted_sweep_*
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130)])
def test_signal_to_metaopt_run_marks_every_run_killed_and_exits_128_plus_signal(tmp_path, signum, code):
    args = tiny_args(tmp_path, "pbt.iterations=400", "pbt.steps_per_iteration=10", "pbt.synch=false")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [str(METAOPT), "run", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env
    )
    lines: list[str] = []
    results_seen = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if "iter" in line and line.startswith("[") and "s]" in line:  # a ProgressPrinter line: trials train
                results_seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert results_seen.wait(180), "no trial result within 180 s:\n" + "".join(lines)
        time.sleep(1.0)
        process.send_signal(signum)
        returncode = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    assert returncode == code, output
    assert "PARTIAL" in output and f"stopped by {signal.Signals(signum).name}" in output, output
    assert "replay it" not in output and "done in" not in output, output
    # metaopt's own output has no traceback; lines a trial's Ray worker forwards ("(LRTrainable pid=...)") may
    # carry Ray's own SystemExit noise when Tune terminates the actor, which is not ours to hide
    driver = [line for line in lines if "pid=" not in line.split(")")[0]]
    assert not any("Traceback" in line for line in driver), output
    runs = statuses(f"sqlite:///{tmp_path / 'mlflow.db'}", "quickstart-tiny")
    parents = {name: status for name, status in runs.items() if name.startswith("quickstart-tiny-pbt-")}
    assert list(parents.values()) == ["KILLED"], runs
    assert len(runs) >= 2 and "RUNNING" not in runs.values(), runs  # the trial runs are ended too


# --- failed sweeps ----------------------------------------------------------------------------------------------


def test_a_sweep_whose_trial_crashed_for_good_is_failed_with_one_line_per_trial(ray_session, tiny, capsys):
    from metaopt.pbt.sweep import run

    exp = tiny("pbt.max_failures=0", "pbt.iterations=3", "pbt.synch=false")
    before = len(session_mod.ended_sweeps())
    summary = run(exp, callbacks=[KillTrialProcess(at_iteration=1)], verbose=0)
    out = capsys.readouterr().out
    outcome = session_mod.ended_sweeps()[before]
    assert (outcome.status, outcome.exit_code, len(outcome.failed)) == ("FAILED", 1, 1)
    (failed,) = outcome.failed
    assert f"[metaopt] trial {failed.trial_id} failed: " in out and "FAILED: 1 of 2 trials" in out, out
    assert "ActorDiedError" in failed.error or "died" in failed.error.lower(), failed.error
    runs = statuses(exp.tracking.uri, exp.mlflow_experiment)
    parent = next(status for name, status in runs.items() if name.startswith("quickstart-tiny-pbt-"))
    assert parent == "FAILED" and sorted(runs.values()) == ["FAILED", "FAILED", "FINISHED"], runs
    assert len(summary.trials) >= 1  # the healthy trial's row survives


def test_an_error_while_logging_the_summary_leaves_no_run_running(ray_session, tiny, monkeypatch):
    from metaopt.pbt import sweep

    def broken(*args, **kwargs):
        raise RuntimeError("plotting broke")

    monkeypatch.setattr(sweep, "log_summary", broken)
    exp = tiny("pbt.iterations=2")
    with pytest.raises(RuntimeError, match="plotting broke"):
        sweep.run(exp, verbose=0)
    runs = statuses(exp.tracking.uri, exp.mlflow_experiment)
    parent = next(status for name, status in runs.items() if name.startswith("quickstart-tiny-pbt-"))
    assert parent == "FAILED" and "RUNNING" not in runs.values(), runs


# --- MLflow trouble mid-sweep ------------------------------------------------------------------------------------


class LockStore(Callback):
    """Another process's writer holds the sqlite store locked for ``seconds`` from the first trial result on."""

    def __init__(self, path: Path, seconds: float):
        self.path, self.seconds = path, seconds
        self.held = False  # plain data: the Tuner pickles its callbacks

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.held:
            return
        self.held = True
        ready = threading.Event()

        def hold() -> None:
            connection = sqlite3.connect(self.path, timeout=30)
            connection.execute("BEGIN EXCLUSIVE")
            ready.set()
            time.sleep(self.seconds)
            connection.rollback()
            connection.close()

        threading.Thread(target=hold, daemon=True).start()
        ready.wait(30)


def test_a_store_locked_by_another_driver_mid_sweep_is_retried_and_nothing_is_lost(ray_session, tiny, tmp_path):
    from metaopt.pbt.sweep import run

    exp = tiny("pbt.iterations=3")
    lock = LockStore(tmp_path / "mlflow.db", seconds=7.0)  # longer than sqlite's own 5 s busy wait
    summary = run(exp, callbacks=[lock], verbose=0)
    assert lock.held
    client = MlflowClient(tracking_uri=exp.tracking.uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and "metaopt.unlogged_writes" not in parent.data.tags
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:  # every iteration's metrics made it, the locked ones included
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == [1, 2, 3]


def test_writes_mlflow_keeps_refusing_are_given_up_with_a_warning_and_training_completes(
    ray_session, tiny, monkeypatch, capsys
):
    from mlflow.exceptions import MlflowException

    from metaopt import tracking
    from metaopt.pbt.sweep import run

    monkeypatch.setattr(tracking, "RETRY_DELAYS_S", (0.01, 0.01))
    real = MlflowClient.log_batch

    def full_disk(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if metrics and not params and not tags:
            raise MlflowException("OSError: [Errno 28] No space left on device")
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", full_disk)
    exp = tiny("pbt.iterations=2")
    summary = run(exp, verbose=0)
    out = capsys.readouterr().out
    assert all(t.iterations == 2 for t in summary.trials)  # training was not cut short
    assert "No space left on device" in out and "did not take" in out, out
    client = MlflowClient(tracking_uri=exp.tracking.uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert int(parent.data.tags["metaopt.unlogged_writes"]) >= 4  # 2 trials x 2 iterations of metrics at least


def test_retries_stop_at_errors_no_retry_can_mend():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from metaopt import tracking

    calls = []

    def bad_request():
        calls.append(1)
        raise MlflowException("bad param", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException):
        tracking.call_with_retries(bad_request, delays=(0.0, 0.0, 0.0))
    assert len(calls) == 1

    flaky = iter([MlflowException("503 Service Unavailable"), None])

    def sometimes():
        error = next(flaky)
        if error:
            raise error
        return "ok"

    assert tracking.call_with_retries(sometimes, delays=(0.0,)) == "ok"


class Refusing:
    """A stand-in MLflow client whose writes fail with ``error``; counts the attempts."""

    def __init__(self, error: Exception):
        self.error, self.attempts = error, 0
        self.tracking_uri = "http://mlflow:5000"

    def log_batch(self, run_id, **kwargs):
        self.attempts += 1
        raise self.error

    def get_run(self, run_id):
        self.attempts += 1
        raise self.error


def test_after_one_given_up_write_later_writes_get_one_try_until_mlflow_answers_again(capsys):
    from metaopt import tracking

    refusing = Refusing(OSError(28, "No space left on device"))
    client = tracking.ResilientClient(refusing, delays=(0.0, 0.0, 0.0))
    assert client.log_batch("run1", metrics=[]) is tracking.GIVEN_UP and refusing.attempts == 4
    assert client.log_batch("run1", metrics=[]) is tracking.GIVEN_UP and refusing.attempts == 5  # one try now
    assert len(client.unlogged) == 2 and "No space left" in client.unlogged[0]
    with pytest.raises(OSError, match="No space left on device"):  # reads are not given up
        client.get_run("run1")
    bug = tracking.ResilientClient(Refusing(TypeError("a bug, not weather")), delays=(0.0,))
    with pytest.raises(TypeError):
        bug.log_batch("run1")
    assert bug.client.attempts == 1


def test_mlflow_errors_quoting_a_uri_with_credentials_are_printed_redacted(monkeypatch, capsys):
    from conftest import free_port
    from metaopt import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://alice:s3cret-pw@127.0.0.1:{free_port()}"  # nothing listens there
    client = tracking.ResilientClient(MlflowClient(tracking_uri=uri), delays=())
    assert client.set_terminated("0123456789abcdef", status="KILLED") is tracking.GIVEN_UP
    out = capsys.readouterr().out
    assert "did not take set_terminated" in out and "s3cret-pw" not in out and "s3cret-pw" not in client.unlogged[0]


def test_runs_opened_in_the_same_second_get_their_own_names(ray_session, tiny, monkeypatch):
    from metaopt import session

    monkeypatch.setattr(session.time, "strftime", lambda pattern: "20261205-120000")
    exp = tiny("pbt.iterations=2")
    opened = [session.open_session(exp, None, "pbt", 0) for _ in range(2)]
    for s in opened:
        s.parent.finish("KILLED")
    assert opened[0].run_name != opened[1].run_name
    assert all(s.run_name.startswith("quickstart-tiny-pbt-20261205-120000-") for s in opened)


# --- two sweeps at once ------------------------------------------------------------------------------------------


def test_two_runs_started_together_on_one_store_both_succeed_in_their_own_folders(tmp_path):
    args = tiny_args(tmp_path, "pbt.iterations=2", "ray.num_cpus=1", "pbt.population=2", "ray.cpus_per_trial=0.5")
    processes = [
        subprocess.Popen(
            [str(METAOPT), "run", *args, "--quiet"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n---\n".join(outputs)
    folders = sorted(p.name for p in (tmp_path / "ray_results").iterdir())
    assert len(folders) == 2, folders
    runs = statuses(f"sqlite:///{tmp_path / 'mlflow.db'}", "quickstart-tiny")
    parents = [name for name in runs if name.startswith("quickstart-tiny-pbt-")]
    assert sorted(parents) == folders and len(runs) == 6 and set(runs.values()) == {"FINISHED"}, runs


# --- secrets ------------------------------------------------------------------------------------------------------


def test_credentials_in_the_tracking_uri_reach_no_param_artifact_or_terminal_line(
    ray_session, tiny, mlflow_server, tmp_path, capsys
):
    from metaopt.pbt.sweep import run

    secret_uri = mlflow_server.replace("http://", "http://alice:s3cret-pw@")
    exp = tiny("pbt.iterations=2", uri=secret_uri, name="creds-check")
    summary = run(exp, verbose=1)
    out = capsys.readouterr().out
    assert "s3cret-pw" not in out and "***@" in out, out
    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.params["tracking.uri"] == mlflow_server.replace("http://", "http://***@")
    assert all("s3cret-pw" not in v for v in parent.data.params.values())
    schedules = Path(client.download_artifacts(summary.parent_run_id, "schedules.json", str(tmp_path)))
    assert "s3cret-pw" not in schedules.read_text() and "alice" not in schedules.read_text()
