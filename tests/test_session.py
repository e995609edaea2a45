"""open_session: Ray first, MLflow's parent run opened in the background while the Tuner starts."""

from __future__ import annotations

import pickle
import threading

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
