"""open_session: Ray first, MLflow's parent run opened in the background while the Tuner starts."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import pytest

from metaopt import session as session_module
from metaopt import tracking
from metaopt.errors import ConfigError


def test_session_returns_before_mlflow_is_open_and_the_callback_waits_for_it(ray_session, tiny, monkeypatch):
    exp = tiny()
    release = threading.Event()
    connect = tracking.connect

    def slow_connect(uri, experiment):  # a first run creating its store: seconds
        assert release.wait(60)
        return connect(uri, experiment)

    monkeypatch.setattr(tracking, "connect", slow_connect)
    session = session_module.open_session(exp, None, "pbt", verbose=0)
    assert not session.opening.done()  # Ray is up, the parent run is still opening
    callback = tracking.MLflowTrialCallback(session.opening)
    # the Tuner pickles its callbacks at once: fine while MLflow is still opening
    early_copy = pickle.loads(pickle.dumps(callback))
    with pytest.raises(RuntimeError, match="pickled before its parent run was open"):
        _ = early_copy.parent

    release.set()
    assert callback.parent.run_id == session.parent.run_id  # the first trial waits for the parent run
    assert session.parent.client.get_run(session.parent.run_id).data.tags["metaopt.role"] == "sweep"
    assert pickle.loads(pickle.dumps(callback)).parent.run_id == session.parent.run_id  # open: travels whole
    session.parent.finish()


def test_session_raises_mlflow_errors_as_one_config_error_where_the_parent_is_used(ray_session, tiny, monkeypatch):
    exp = tiny()

    def broken_connect(uri, experiment):
        raise PermissionError(f"cannot create {uri}\nsecond line of detail")

    monkeypatch.setattr(tracking, "connect", broken_connect)
    session = session_module.open_session(exp, None, "pbt", verbose=0)
    expected = f"tracking.uri: MLflow cannot use {exp.tracking.uri}: cannot create {exp.tracking.uri}"
    with pytest.raises(ConfigError) as raised:
        _ = session.parent
    assert str(raised.value) == expected and isinstance(raised.value.__cause__, PermissionError)
    callback = tracking.MLflowTrialCallback(session.opening)
    assert pickle.loads(pickle.dumps(callback))._parent is None  # the Tuner pickles it: the failure stays here
    with pytest.raises(ConfigError, match="MLflow cannot use"):
        _ = callback.parent


def sqlite_schema(path) -> tuple[list, list]:
    """Every table, index and trigger with the lines of its SQL, and the alembic revision: what makes two stores
    the same. The lines are compared as a set: MLflow's own migrations write a table's CHECK constraints in an
    order that differs from one process to the next."""
    import sqlite3

    def lines(sql):
        return sorted(line.strip().rstrip(",") for line in (sql or "").splitlines())

    with sqlite3.connect(path) as con:
        rows = con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
        objects = sorted((kind, name, table, lines(sql)) for kind, name, table, sql in rows)
        return objects, con.execute("SELECT version_num FROM alembic_version").fetchall()


def test_a_new_sqlite_store_is_seeded_with_the_store_mlflow_would_make(tmp_path, monkeypatch):
    import mlflow.store.db.utils

    monkeypatch.setenv("METAOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # MLflow puts the Default experiment's artifacts under the working directory
    oracle = tmp_path / "made-by-mlflow.db"
    oracle_client = tracking.MlflowClient(tracking_uri=f"sqlite:///{oracle}")
    expected = oracle_client.get_experiment("0")  # MLflow creates its store on first use
    assert tracking.seed_sqlite_store(f"sqlite:///{tmp_path / 'first.db'}")  # builds the template, then copies it
    assert len(list((tmp_path / "cache").glob("mlflow-*-empty-store.db"))) == 1

    def no_migrations(engine):
        raise AssertionError("a seeded store must not be created again by MLflow")

    monkeypatch.setattr(mlflow.store.db.utils, "_initialize_tables", no_migrations)
    client, experiment_id = tracking.connect(f"sqlite:///{tmp_path / 'second.db'}", "seeded")
    assert sqlite_schema(tmp_path / "second.db") == sqlite_schema(oracle)
    default = client.get_experiment("0")
    assert (default.name, default.artifact_location) == (expected.name, expected.artifact_location)
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.5, step=3)
    assert [(m.value, m.step) for m in client.get_metric_history(run.info.run_id, "loss")] == [(0.5, 3)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".db") == ["cache"]  # no seed copy left behind
    mode = os.stat(tmp_path / "second.db").st_mode & 0o777
    assert mode == os.stat(oracle).st_mode & 0o777  # the permissions sqlite gives a new file, not mkstemp's 0600


def test_seeding_leaves_existing_stores_alone_and_rebuilds_a_broken_template(tmp_path, monkeypatch):
    monkeypatch.setenv("METAOPT_CACHE_DIR", str(tmp_path / "cache"))
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"someone's data")
    assert not tracking.seed_sqlite_store(f"sqlite:///{existing}")
    assert existing.read_bytes() == b"someone's data"
    assert not tracking.seed_sqlite_store(f"sqlite:///{tmp_path / 'opts.db'}?mode=rw")  # options: MLflow's way
    assert not tracking.seed_sqlite_store("http://127.0.0.1:5000") and not tracking.seed_sqlite_store(
        "sqlite:///:memory:"
    )
    spaced = tmp_path / "my runs.db"
    assert tracking.seed_sqlite_store(f"sqlite:///{tmp_path}/my%20runs.db") and tracking.is_sqlite_file(spaced)
    spaced.unlink()  # the file SQLAlchemy opens for that URI, not one named with the %20
    real_link = os.link

    def another_process_was_first(source, target):
        Path(target).write_bytes(b"the other process's store")
        real_link(source, target)

    monkeypatch.setattr(os, "link", another_process_was_first)
    assert not tracking.seed_sqlite_store(f"sqlite:///{tmp_path / 'raced.db'}")
    assert (tmp_path / "raced.db").read_bytes() == b"the other process's store"
    (tmp_path / "raced.db").unlink()
    monkeypatch.setattr(os, "link", real_link)
    template = tracking.empty_store_template()
    template.write_bytes(b"truncated")
    assert tracking.empty_store_template() == template and tracking.is_sqlite_file(template)  # made again
    monkeypatch.setenv("METAOPT_CACHE_DIR", str(existing / "not-a-folder"))  # a cache that cannot be written
    assert tracking.empty_store_template() is None and not tracking.seed_sqlite_store(f"sqlite:///{tmp_path / 'n.db'}")
    assert not (tmp_path / "n.db").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "existing.db"]
