"""MLflow at the edge: one MLflow experiment per experiment name, a parent run per sweep, a child run per trial.

The default store is ``sqlite:///mlflow.db`` in the working directory (no server needed); any
``http://HOST:PORT`` tracking server works the same. Trial runs are written by a Tune callback in the
driver, batched into one ``log_batch`` call per Tune result, so tracking costs one round-trip per iteration
rather than one per metric.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from metaopt.cache import cache_dir, write_atomically
from metaopt.compat import mlflow as compat_mlflow
from metaopt.errors import ConfigError
from metaopt.redact import redact_config, redact_text, redact_uri, strip_userinfo

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """An ``http(s)://`` tracking URI must answer: else one line now, not MLflow's retries for minutes and then
    a traceback. Any HTTP answer counts (a server behind a login answers 401); only no answer is an error."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        # urllib reads no user:password@ in a URL; /health needs no login anyway
        urllib.request.urlopen(f"{strip_userinfo(uri).rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            "tracking.uri",
            f"no MLflow server answers at {redact_uri(uri)} ({reason}); start one "
            "(mlflow server --host 127.0.0.1 --port 5000) or use sqlite:///mlflow.db",
        ) from None


def check_sqlite_store(uri: str) -> None:
    """A ``sqlite:///PATH`` store must be creatable where it points: else one line now, not a traceback from the
    thread that opens MLflow while the sweep starts. Creates the missing parent folders (as MLflow would) and a
    scratch file beside the database, which it removes."""
    path = sqlite_path(uri)
    if path is None:
        return
    if path.is_dir():
        raise ConfigError("tracking.uri", f"{uri} names a folder, not a database file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path.parent, prefix=".metaopt-check-").close()
    except OSError as err:
        raise ConfigError(
            "tracking.uri",
            f"cannot create the MLflow store {path} ({err.strerror or err}); "
            "point it somewhere writable, e.g. sqlite:///mlflow.db",
        ) from None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI as SQLAlchemy, and so MLflow, reads it (``%20`` decoded, no
    ``~`` expansion, options after ``?`` apart); None for other stores and for an in-memory database."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    from sqlalchemy.engine import make_url

    return Path(make_url(uri).database or "")  # typed str | None; a sqlite:/// URL always has one, "" at least


SQLITE_HEADER = b"SQLite format 3\x00"


def empty_store_template_path() -> Path:
    """Where the cached empty store of this MLflow release, migration set and SQLAlchemy lives (it may not yet)."""
    import sqlalchemy

    versions = Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions"
    migrations = sorted(p.name for p in versions.glob("*.py"))
    schema = hashlib.sha1("\n".join(migrations).encode()).hexdigest()[:12]
    return cache_dir() / f"mlflow-{mlflow.__version__}-{schema}-sqlalchemy-{sqlalchemy.__version__}-empty-store.db"


def empty_store_template() -> Path | None:
    """An MLflow sqlite store with every table at this MLflow's schema and nothing in it (not even the Default
    experiment), made once in the cache directory (:func:`empty_store_template_path`); None if it cannot be.

    MLflow makes a store by creating its first tables and then running every schema migration since (~70): about
    a CPU-second, and seconds of wall time next to a sweep's trial processes starting on 2 cores (measured in
    benchmarks/pbt_overhead.py sweeps; the figures are in benchmarks/results.csv). The template is made by that
    same private function (:mod:`metaopt.compat.mlflow`; on an MLflow version it does not know, no template) and
    checked to be at the newest revision MLflow knows, so a copy of it is the store MLflow would have made, less
    what it adds on opening."""
    path = empty_store_template_path()
    if is_sqlite_file(path):
        return path
    if not compat_mlflow.can_build_empty_store():  # another MLflow version: it makes its stores itself
        return None

    def build(tmp: Path) -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(sqlalchemy.engine.URL.create("sqlite", database=str(tmp)))
        try:
            compat_mlflow.build_empty_store(engine)
        except Exception as err:  # only a shortcut: MLflow's own creation follows, and says what is wrong
            raise OSError(f"cannot build an empty MLflow store: {err}") from err
        finally:
            engine.dispose()
        with tmp.open("rb+") as handle:  # on disk before it is renamed into place
            os.fsync(handle.fileno())

    return path if write_atomically(path, build) else None


def is_sqlite_file(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def seed_sqlite_store(uri: str) -> bool:
    """A ``sqlite:///`` store that does not exist yet starts as a copy of :func:`empty_store_template` (a file copy,
    a small fraction of what MLflow's own creation takes). MLflow then opens it as an existing store, checks its
    schema, and adds the Default experiment itself, with this store's artifact location. True when the store was
    seeded; False, and MLflow creates the store as usual, for an existing file, a URI with options, another kind
    of store, a missing folder, or a cache that cannot be used. The file gets the permissions sqlite would give it
    (0666 less the umask)."""
    path = sqlite_path(uri)
    if path is None or "?" in uri or path.exists() or path.is_symlink():
        return False
    template = empty_store_template()
    if template is None:
        return False
    seed = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.seed")
    try:
        os.close(os.open(seed, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as for sqlite
    except OSError:
        return False
    try:
        shutil.copyfile(template, seed)
        os.link(seed, path)  # never over a store another process or thread created meanwhile
    except OSError:
        return False
    finally:
        seed.unlink(missing_ok=True)
    return True


#: Seconds to wait before each retry of an MLflow call that failed for a reason that may pass (a 5xx answer, a
#: sqlite store another driver holds locked, a full disk being cleared): ~15 s in all, then a write is given up.
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)

#: MLflow error codes that no retry can mend: the request itself is wrong.
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "BAD_REQUEST",
        "INVALID_STATE",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    }
)

#: Client methods that only write what a sweep reports: given up after the retries (a warning, and the write is
#: counted in :attr:`ResilientClient.unlogged`) rather than ending a sweep whose trials are healthy.
_WRITES = frozenset(
    {
        "log_batch",
        "log_artifact",
        "log_artifacts",
        "log_text",
        "log_dict",
        "log_figure",
        "log_metric",
        "log_param",
        "set_tag",
        "set_terminated",
        "update_run",
    }
)

#: What a given-up write returns instead of MLflow's answer (callers that must know, such as ending a run, check).
GIVEN_UP = object()


def is_transient(err: BaseException) -> bool:
    """May the same MLflow call succeed if made again? MLflow errors unless they name a bad request; I/O and
    network errors (``OSError``: a full disk, a refused or reset connection, requests' errors); SQLAlchemy's
    operational errors (a locked sqlite store). A ``TypeError`` or the like is a bug, not weather."""
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code not in _PERMANENT_CODES
    return isinstance(err, (OSError, sqlalchemy.exc.OperationalError))


def call_with_retries(call, *args, delays: tuple[float, ...] | None = None, **kwargs):
    """``call(*args, **kwargs)``, made again after each of ``delays`` (default :data:`RETRY_DELAYS_S`) while it
    fails for a transient reason; the last failure is raised."""
    for delay in (*(RETRY_DELAYS_S if delays is None else delays), None):
        try:
            return call(*args, **kwargs)
        except Exception as err:  # sorted by is_transient; the last failure is raised
            if delay is None or not is_transient(err):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def first_line(err: BaseException) -> str:
    """An exception in one line, credentials in any URI it quotes replaced by ``***``."""
    text = redact_text(str(err).strip())
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


class ResilientClient:
    """An :class:`MlflowClient` whose calls retry with backoff (:data:`RETRY_DELAYS_S`) on errors that may pass.

    Writes (:data:`_WRITES`) that still fail, or that MLflow refuses outright, are given up: one warning line,
    the write recorded in :attr:`unlogged`, :data:`GIVEN_UP` returned, and the sweep goes on -- a busy or full
    tracking store must not end trials that train well. Once a write has been given up, later writes get one try
    each until one succeeds again, so an outage costs the sweep one retry budget, not one per metric batch.
    Reads and run creation raise after the retries, as MLflow would have at once; errors that are bugs
    (:func:`is_transient` false and not MLflow's) raise at once."""

    def __init__(self, client: MlflowClient, delays: tuple[float, ...] | None = None):
        self.client = client
        self.delays = delays
        self.unlogged: list[str] = []
        self.degraded = False  # a write was given up and none has succeeded since

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("client", "delays", "unlogged", "degraded"):  # unpickling: not yet set
            raise AttributeError(name)
        method = getattr(self.client, name)
        if not callable(method):
            return method
        if name not in _WRITES:
            return lambda *args, **kwargs: call_with_retries(method, *args, delays=self.delays, **kwargs)

        def write(*args, **kwargs):
            from mlflow.exceptions import MlflowException

            try:
                answer = call_with_retries(method, *args, delays=() if self.degraded else self.delays, **kwargs)
            except Exception as err:  # after the client's retries: tracking trouble, not the trial's
                if not (isinstance(err, MlflowException) or is_transient(err)):
                    raise
                what = f"{name} on run {args[0] if args else kwargs.get('run_id', '?')}"
                self.unlogged.append(f"{what}: {first_line(err)}")
                self.degraded = True
                print(
                    f"[metaopt] warning: MLflow did not take {what} ({first_line(err)}); training goes on", flush=True
                )
                return GIVEN_UP
            self.degraded = False
            return answer

        return write


def create_run_once(
    client: ResilientClient, experiment_id: str, run_name: str, tags: dict[str, str], identity: str | None = None
):
    """``client.create_run``, retried like other calls, but never twice: a request that timed out may have
    created the run on the server, so before each retry the run is looked up by ``identity`` (an MLflow filter
    that only this run matches; default: its name, unique per sweep)."""
    identity = identity or f"attributes.run_name = '{run_name}'"

    tried = False

    def attempt():
        nonlocal tried
        if tried:
            found = client.client.search_runs([experiment_id], filter_string=identity, max_results=1)
            if found:
                return found[0]
        tried = True
        return client.client.create_run(experiment_id, run_name=run_name, tags=tags)

    return call_with_retries(attempt, delays=client.delays)


def connect(uri: str, experiment: str) -> tuple[ResilientClient, str]:
    """Point MLflow at ``uri`` and return a client and the id of ``experiment`` (created if absent); callers
    run :func:`check_server` first. A new sqlite store is seeded from the cached empty one. Two drivers that
    create the same experiment at once both get it (the loser of the race reads the winner's)."""
    from mlflow.exceptions import MlflowException

    # Seeding is only a shortcut (a cache that cannot be found, say): MLflow makes the store.
    with contextlib.suppress(Exception):
        seed_sqlite_store(uri)
    # MLflow's HTTP client retries a failing request 7 times with doubling waits (minutes); ours retries every
    # call a few times and then gives writes up, so the sweep is not held for minutes per metric batch.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    # MLflow prints a run's URL, credentials and all, each time a run ends on a server; metaopt says where the
    # runs are once, redacted.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri)
    client = ResilientClient(call_with_retries(MlflowClient, tracking_uri=uri))
    found = client.get_experiment_by_name(experiment)
    if found is not None and found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    if found is not None:
        return client, found.experiment_id
    try:
        return client, client.create_experiment(experiment)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client, client.get_experiment_by_name(experiment).experiment_id


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'pbt': {'lr_min': 1e-4}} -> {'pbt.lr_min': 1e-4}``: MLflow params are flat key/value pairs."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def as_params(config: dict[str, Any]) -> list[Param]:
    """A config as MLflow params, credentials in URIs (``user:password@``) replaced by ``***``."""
    return [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(redact_config(config)).items()]


def finite_metrics(result: dict[str, Any], step: int, timestamp_ms: int) -> list[Metric]:
    """Numeric, finite entries of a result as MLflow metrics (MLflow rejects inf; NaN says nothing)."""
    metrics = []
    for key, value in flatten(result).items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics.append(Metric(metric_name(key), float(value), timestamp_ms, step))
    return metrics


def metric_name(key: str) -> str:
    """A result key as an MLflow metric name: ``/`` becomes ``.``; characters MLflow rejects become ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. :]", "_", key.replace("/", "."))


class ParentRun:
    """The sweep's run: resolved config as params, summary metrics, plots and result files as artifacts."""

    def __init__(self, client: ResilientClient, experiment_id: str, run_name: str, config: dict[str, Any]):
        self.client = client
        run = create_run_once(client, experiment_id, run_name, tags={"metaopt.role": "sweep"})
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id
        client.log_batch(self.run_id, params=as_params(config))

    def log_metrics(self, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=finite_metrics(metrics, 0, now))

    def log_json(self, name: str, payload: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(payload, indent=2, default=str))
            self.client.log_artifact(self.run_id, str(path))

    def log_csv(self, name: str, header: list[str], rows: list[list[Any]]) -> None:
        """A table as a CSV artifact (e.g. ``summary.csv``, one row per trial)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(header)
                writer.writerows(rows)
            self.log_file(path)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure, name: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, figure, name)
        plt.close(figure)  # logged: free it (sweeps draw many)

    def finish(self, status: str = "FINISHED"):
        """End the run with ``status``; :data:`GIVEN_UP` if MLflow would not take it."""
        return self.client.set_terminated(self.run_id, status=status)

    @property
    def unlogged(self) -> list[str]:
        """Writes to MLflow given up after retries during this sweep (see :class:`ResilientClient`)."""
        return getattr(self.client, "unlogged", [])


class MLflowTrialCallback(Callback):
    """A child MLflow run per Tune trial under the sweep's parent run.

    Params = the trial's initial config, flattened (PBT changes ``lr`` later; the lr actually used is a metric
    every iteration, and the lineage schedule is an artifact of the parent). One ``log_batch`` per result.
    ``parent`` may still be opening (a future): the first trial waits for it, so Tune starts its trial
    processes while MLflow creates its store.
    """

    def __init__(self, parent: ParentRun | Future[ParentRun]):
        self._parent: ParentRun | Future[ParentRun] | None = parent
        self.trial_runs: dict[str, str | None] = {}
        self.open_runs: set[str] = set()  # child runs created and not yet ended

    @property
    def parent(self) -> ParentRun:
        if isinstance(self._parent, Future):
            self._parent = self._parent.result()
        if self._parent is None:
            raise RuntimeError("this copy of the MLflow trial callback was pickled before its parent run was open")
        return self._parent

    def __getstate__(self) -> dict[str, Any]:
        # The Tuner pickles its callbacks when it is built (for Tuner.restore, which metaopt does not use), which
        # may be before MLflow has opened the parent run: an open one travels, one still opening (or failed) does not.
        state = dict(self.__dict__)
        if isinstance(self._parent, Future):
            opened = self._parent.done() and self._parent.exception() is None
            state["_parent"] = self._parent.result() if opened else None
        return state

    def run_id_for(self, trial) -> str | None:
        """The trial's child run, created on first use; None if MLflow could not create it (then what the trial
        reports is not logged, counted in the parent client's ``unlogged``, and the trial trains on)."""
        if trial.trial_id not in self.trial_runs:
            parent, client = self.parent, self.parent.client
            tags = {PARENT_TAG: parent.run_id, "trial_id": trial.trial_id, "metaopt.role": "trial"}
            try:
                identity = f"tags.`{PARENT_TAG}` = '{parent.run_id}' and tags.trial_id = '{trial.trial_id}'"
                run = create_run_once(client, parent.experiment_id, str(trial), tags, identity)
            except Exception as err:
                client.unlogged.append(f"the run of trial {trial.trial_id}: {first_line(err)}")
                print(
                    f"[metaopt] warning: MLflow could not create the run of trial {trial.trial_id} "
                    f"({first_line(err)}); it trains on untracked",
                    flush=True,
                )
                self.trial_runs[trial.trial_id] = None
                return None
            self.trial_runs[trial.trial_id] = run.info.run_id
            self.open_runs.add(run.info.run_id)
            client.log_batch(run.info.run_id, params=as_params(trial.config))
        return self.trial_runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("training_iteration", 0))
        metrics = finite_metrics(_trial_metrics(result), step, int(time.time() * 1000))
        run_id = self.run_id_for(trial)
        if run_id is None:
            return
        if run_id not in self.open_runs:  # a trial resumed after it was ended (PBT restarts, restores)
            self.parent.client.update_run(run_id, status="RUNNING")
            self.open_runs.add(run_id)
        self.parent.client.log_batch(run_id, metrics=metrics)
        for key, text in text_results(result).items():  # e.g. sample completions: one text file per iteration
            self.parent.client.log_text(run_id, text, f"{key}/iter_{step:04d}.txt")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")

    def _end(self, trial, status: str) -> None:
        run_id = self.run_id_for(trial)
        if run_id is None:
            return
        diverged = bool((trial.last_result or {}).get("diverged"))
        tags = [RunTag("metaopt.diverged", str(diverged).lower())]
        self.parent.client.log_batch(run_id, tags=tags)
        if self.parent.client.set_terminated(run_id, status=status) is not GIVEN_UP:
            self.open_runs.discard(run_id)  # else close_open_runs tries again at the sweep's end

    def close_open_runs(self, status: str) -> list[str]:
        """End every trial run still open (a sweep stopped or failed before its trials ended) with ``status``;
        returns their ids. Safe to call when the parent never opened."""
        closing = sorted(self.open_runs)
        if not closing or not isinstance(self._parent, ParentRun):
            return closing
        for run_id in closing:
            if self._parent.client.set_terminated(run_id, status=status) is not GIVEN_UP:
                self.open_runs.discard(run_id)
        return closing


_RESULT_NOISE = {"config", "hostname", "node_ip", "pid", "date", "trial_id", "experiment_tag", "done", "timestamp"}


def text_results(result: dict[str, Any]) -> dict[str, str]:
    """Result entries named ``*_text`` holding a string: logged as text artifacts of the trial's run."""
    return {k: v for k, v in result.items() if k.endswith("_text") and isinstance(v, str)}


def _trial_metrics(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in _RESULT_NOISE}


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """The trial runs of a sweep (used by replay and the tests)."""
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def ui_command(uri: str) -> str:
    """The command a user types to look at the runs."""
    uri = redact_uri(uri)  # printed: never the credentials
    if uri.startswith("http"):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def progress_rows(trial_path: str):
    """Every result a trial reported, in order, from Tune's ``progress.csv``.

    (``Result.metrics_dataframe`` reads ``result.json``, which was seen to miss rows reported after a PBT
    restore; the CSV log is complete.)
    """
    import pandas as pd

    path = Path(trial_path) / "progress.csv"
    if not path.exists():
        return None
    return pd.read_csv(path)
