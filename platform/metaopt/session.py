"""The start every capability's ``run`` shares: Ray (local or cluster), MLflow, the parent run, Tune storage.

``open_session`` connects to Ray once per process (``metaopt.runtime``), checks the per-trial resources
against what the cluster has, opens the MLflow experiment and the experiment's parent run, and says where
both are on the terminal.
"""

from __future__ import annotations

import logging
import re
import secrets
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy.exc

from metaopt import runtime, stopping, tracking
from metaopt.config import Experiment
from metaopt.errors import ConfigError
from metaopt.redact import redact_text, redact_uri
from metaopt.tuning import SweepSettings


@dataclass
class Session:
    resources: runtime.Resources
    per_trial: dict[str, float]
    opening: Future[tracking.ParentRun]  # the parent run, still being opened while the Tuner starts
    storage_path: str
    run_name: str

    @property
    def parent(self) -> tracking.ParentRun:
        """The sweep's parent run (waits until MLflow has opened it; raises what opening it raised)."""
        return self.opening.result()


def open_session(exp: Experiment, address: str | None, run_label: str, verbose: int) -> Session:
    """Ray + MLflow + parent run ``<name>-<run_label>-<time>``; ``verbose`` < 2 hides Tune's result-file noise.

    Returns once Ray is up. MLflow opens its store and the parent run in a background thread: on a first run,
    seconds of creating its tables (longer than Ray's own start on 2 cores for the quickstart; the figures are in
    benchmarks/results.csv), during which Ray starts and then Tune starts the trial processes. Pass
    :attr:`Session.opening` to :class:`tracking.MLflowTrialCallback`; :attr:`Session.parent` waits for it.
    """
    if verbose < 2:
        # Tune warns "Remote file not found: result.json" each time a reused actor restores a trial whose
        # result file it has not written yet; harmless (progress.csv is what we read) and it buries the table.
        logging.getLogger("ray.tune.logger.logger").setLevel(logging.ERROR)
    # a malformed or dead Ray address (ray.init would retry for minutes), an unreachable server or an unwritable
    # store is one error line before anything starts (and before MLflow writes a store)
    from metaopt.config import check_ray_address

    check_ray_address(address, exp.ray)
    tracking.check_server(exp.tracking.uri)
    tracking.check_sqlite_store(exp.tracking.uri)
    # A random suffix: two sweeps started in the same second (same store, same name) get their own runs and their
    # own Tune folders (ray_results/<run_name>, with its PBT log), not one shared folder.
    run_name = f"{exp.name}-{run_label}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metaopt-mlflow")
    try:
        connecting = pool.submit(tracking.connect, exp.tracking.uri, exp.mlflow_experiment)
        resources = runtime.init(exp.ray, address)
        stopping.arm()  # after ray.init, which installs a SIGTERM handler that would exit at once
        per_trial = runtime.trial_resources(exp.ray, resources)
        print(f"[metaopt] {resources.describe()}", flush=True)
        # Only once Ray is up and the resources fit: a failed start leaves no parent run behind.
        opening = pool.submit(open_parent, connecting, exp, run_name)
    finally:
        pool.shutdown(wait=False)
    storage = str(Path(exp.ray.storage_path or "ray_results").expanduser().resolve())
    return Session(resources, per_trial, opening, storage, run_name)


def open_parent(
    connecting: Future[tuple[tracking.ResilientClient, str]], exp: Experiment, run_name: str
) -> tracking.ParentRun:
    """The sweep's parent run, once MLflow is connected. A store MLflow cannot open or read (a file error, not a
    database) is a :class:`ConfigError` on ``tracking.uri``, raised wherever the parent is first needed
    (capabilities ask for it when a fit fails); other MLflow errors pass through as they are."""
    try:
        client, experiment_id = connecting.result()
        parent = tracking.ParentRun(client, experiment_id, run_name, exp.to_dict())
    except (OSError, sqlalchemy.exc.DatabaseError) as err:
        if "database is locked" in str(err):  # another process holds the sqlite file: not the configuration
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("tracking.uri", f"MLflow cannot use {redact_uri(exp.tracking.uri)}: {reason}") from err
    print(
        f"[metaopt] MLflow: experiment {exp.mlflow_experiment!r}, run {parent.run_id} "
        f"at {redact_uri(exp.tracking.uri)}",
        flush=True,
    )
    return parent


@dataclass(frozen=True)
class TrialEnd:
    """How one trial ended: its last iteration, whether it said it was done, and its first error line."""

    trial_id: str
    iterations: int
    done: bool
    error: str | None


def first_error_line(error: BaseException) -> str:
    """The trial's own exception in one line, under the wrappers Ray and Tune put around it (their ``cause``; an
    actor that died raising in its ``__init__`` keeps only the text of the user's traceback, whose last line is
    taken), without Ray's terminal colour codes."""
    from metaopt.errors import ConfigError

    cause, seen = error, set()
    while (inner := getattr(cause, "cause", None)) is not None and id(cause) not in seen:
        seen.add(id(cause))
        cause = inner
    text = _ANSI_CODES.sub("", str(cause)).strip()
    if isinstance(cause, ConfigError) and not hasattr(cause, "cause"):
        return text.splitlines()[0] if text else cause.__class__.__name__
    raised = _raised_in_traceback(text)
    if raised is not None:
        return redact_text(raised)
    return _ANSI_CODES.sub("", tracking.first_line(cause))


_ANSI_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# the last line of a traceback: ``[package.module.]ErrorType: message``
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): ?(.*)$")


def _raised_in_traceback(text: str) -> str | None:
    """The exception a traceback in ``text`` ends with (``ErrorType: message``; a ConfigError as its own line), or
    None when ``text`` holds no traceback (no ``  File "..."`` frame line; Ray's text of a task error drops the
    ``Traceback`` header)."""
    lines = text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "') and line[:1].isspace()]
    if not frames:
        return None
    for line in reversed(lines[frames[0] + 1 :]):
        match = _EXCEPTION_LINE.match(line.strip()) if line and not line[0].isspace() else None
        if match:
            kind, message = match.groups()
            if kind == "ConfigError":
                return message[:300] or kind
            return f"{kind}: {message[:300]}" if message else kind
    return None


def trial_end(result) -> TrialEnd:
    """A Tune ``Result`` as a :class:`TrialEnd` (a trial that never reported has no metrics and 0 iterations)."""
    metrics = result.metrics or {}
    return TrialEnd(
        trial_id=str(metrics.get("trial_id") or Path(str(result.path)).name),
        iterations=int(metrics.get("training_iteration", 0) or 0),
        done=bool(metrics.get("done")),
        error=first_error_line(result.error) if result.error else None,
    )


@dataclass(frozen=True)
class SweepOutcome:
    """What a sweep's trials did, against what it asked of them: ``iterations`` each.

    A trial without an error that neither reached ``iterations`` nor said it was done (a fixed-lr baseline stops
    a diverged trial) was stopped: the sweep is partial. A stop signal makes it partial too."""

    trials: tuple[TrialEnd, ...]
    iterations: int
    stop_signal: int | None = None
    unlogged: tuple[str, ...] = ()
    run_id: str | None = None  # the sweep's MLflow run (None: it never opened)
    trial_runs: tuple[tuple[str, str], ...] = ()  # (trial id, its MLflow run id)

    @property
    def failed(self) -> list[TrialEnd]:
        return [t for t in self.trials if t.error]

    @property
    def unfinished(self) -> list[TrialEnd]:
        return [t for t in self.trials if not t.error and not t.done and t.iterations < self.iterations]

    @property
    def stopped(self) -> bool:
        return self.stop_signal is not None or bool(self.unfinished)

    @property
    def status(self) -> str:
        """The MLflow status of the sweep's run."""
        return "KILLED" if self.stopped else "FAILED" if self.failed else "FINISHED"

    @property
    def exit_code(self) -> int:
        """0 complete, 1 when a trial failed, 128 + the signal when stopped (130: Ctrl-C)."""
        return stopping.exit_code(self.stop_signal) if self.stopped else 1 if self.failed else 0


class SweepStopped(KeyboardInterrupt):
    """Raised once a stopped sweep has logged and printed what it had: the caller sees a Ctrl-C, as it asked."""

    def __init__(self, outcome: SweepOutcome):
        super().__init__(f"sweep stopped by {stopping.signal_name(outcome.stop_signal)}")
        self.outcome = outcome


_ENDED: list[SweepOutcome] = []


def ended_sweeps() -> list[SweepOutcome]:
    """The outcomes of the sweeps this process ended, in order (``metaopt run`` exits with the last one's code)."""
    return list(_ENDED)


class SweepEnd:
    """The end of a sweep, whatever ends it:
    ``with SweepEnd(...) as end: results = tuner.fit(); end.conclude(results)``.

    On leaving, the sweep's MLflow run and every trial run still open get a final status -- FINISHED, FAILED (a
    trial failed, or the code raised, logging the summary included) or KILLED (Ctrl-C, SIGTERM, trials stopped
    before their last iteration) -- so no run is left RUNNING. It prints one line per failed trial, what MLflow
    did not take, and either ``done`` or that the results are partial. A stopped sweep then raises
    :class:`SweepStopped` after its partial summary is logged and printed."""

    def __init__(
        self, exp: Experiment, session: Session, callback: tracking.MLflowTrialCallback, iterations: int, started: float
    ):
        self.exp, self.session, self.callback = exp, session, callback
        self.iterations, self.started = iterations, started
        self.outcome: SweepOutcome | None = None

    def __enter__(self) -> SweepEnd:
        return self

    def conclude(self, results) -> SweepOutcome:
        """Read how the trials ended, right after ``tuner.fit()`` returned."""
        stopping.after_fit()  # records a Ctrl-C Tune caught; re-arms (fit() leaves Tune's handler behind)
        self.outcome = SweepOutcome(tuple(trial_end(r) for r in results), self.iterations, stopping.received())
        return self.outcome

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        with stopping.deferred():  # a second Ctrl-C must not leave the runs half-ended
            outcome, status, parent = self._end_runs(exc)
        _ENDED.append(outcome)
        self._report(outcome, status, parent, exc)
        if outcome.stopped and (exc is None or not isinstance(exc, KeyboardInterrupt)):
            # stopped, and perhaps the partial summary then failed: still a stop, with the error chained
            raise SweepStopped(outcome) from exc
        return False

    def _end_runs(self, exc: BaseException | None) -> tuple[SweepOutcome, str, tracking.ParentRun | None]:
        """The sweep's final status, given to its run and every trial run still open."""
        outcome = self.outcome
        if outcome is None:
            stop_signal = stopping.received() or signal_number(exc)
            if isinstance(exc, KeyboardInterrupt) and stop_signal is None:
                stop_signal = signal.SIGINT
            outcome = SweepOutcome((), self.iterations, stop_signal)
        elif outcome.stop_signal is None and stopping.received():  # a signal while the summary was written
            outcome = SweepOutcome(outcome.trials, outcome.iterations, stopping.received())
        if outcome.stopped or isinstance(exc, KeyboardInterrupt):
            status = "KILLED"
        elif exc is not None:
            status = "FAILED"
        else:
            status = outcome.status
        parent = self._parent()
        try:
            self.callback.close_open_runs(status)
        finally:
            if parent is not None:
                finished = parent.finish(status) is not tracking.GIVEN_UP
                unlogged = list(parent.unlogged)
                if unlogged:
                    parent.client.set_tag(parent.run_id, "metaopt.unlogged_writes", str(len(unlogged)))
                if not finished:
                    print(
                        f"[metaopt] warning: the sweep's run {parent.run_id} could not be marked {status}; "
                        "the store shows it RUNNING",
                        flush=True,
                    )
                trial_runs = tuple(sorted((trial, run) for trial, run in self.callback.trial_runs.items() if run))
                outcome = SweepOutcome(
                    outcome.trials, outcome.iterations, outcome.stop_signal, tuple(unlogged), parent.run_id, trial_runs
                )
        return outcome, status, parent

    def _parent(self) -> tracking.ParentRun | None:
        try:
            return self.session.opening.result()
        except Exception:  # it never opened: nothing to end (the cause is raised elsewhere)
            return None

    def _report(self, outcome: SweepOutcome, status: str, parent: tracking.ParentRun | None, exc) -> None:
        seconds = time.time() - self.started
        for trial in outcome.failed:
            print(f"[metaopt] trial {trial.trial_id} failed: {trial.error}", flush=True)
        if outcome.unlogged:
            print(
                f"[metaopt] warning: MLflow did not take {len(outcome.unlogged)} write(s) of this sweep; first: "
                f"{outcome.unlogged[0]}",
                flush=True,
            )
        run = f"the sweep's run {parent.run_id}" if parent else "the sweep"
        if status == "KILLED":
            unfinished = len(outcome.unfinished) if outcome.trials else "some"
            cause = stopping.signal_name(outcome.stop_signal) if outcome.stop_signal else "Tune (trials did not finish)"
            if exc is not None and not isinstance(exc, KeyboardInterrupt):
                print(f"[metaopt] the partial summary failed: {tracking.first_line(exc)}", flush=True)
            print(
                f"[metaopt] stopped by {cause} after {seconds:.1f}s: results are "
                f"PARTIAL ({unfinished} of {len(outcome.trials) or 'the'} trials did not finish); {run} and its "
                f"open trial runs are marked KILLED. Tune kept its state in "
                f"{Path(self.session.storage_path) / self.session.run_name}; a new `metaopt run` starts afresh.",
                flush=True,
            )
        elif status == "FAILED" and exc is None:
            print(
                f"[metaopt] FAILED: {len(outcome.failed)} of {len(outcome.trials)} trials ended in error "
                f"({seconds:.1f}s); {run} is marked FAILED. Look at the runs: "
                f"{tracking.ui_command(self.exp.tracking.uri)}",
                flush=True,
            )
        elif status == "FAILED":
            print(
                f"[metaopt] the sweep failed after {seconds:.1f}s ({tracking.first_line(exc)}); {run} is marked FAILED",
                flush=True,
            )
        else:
            print(
                f"[metaopt] done in {seconds:.1f}s. Look at the runs: {tracking.ui_command(self.exp.tracking.uri)}",
                flush=True,
            )


def signal_number(exc: BaseException | None) -> int | None:
    outcome = getattr(exc, "outcome", None)
    return outcome.stop_signal if outcome is not None else None


def sweep_settings(session: Session, exp: Experiment, callbacks: list[Any], verbose: int) -> SweepSettings:
    """The settings every capability's Tuner takes from the session and ``exp.ray``, with Tune's ``callbacks``;
    ``verbose`` is metaopt's (2 = Tune's own output, which Tune calls verbosity 1; below that Tune is quiet)."""
    return SweepSettings(
        experiment_name=session.run_name,
        storage_path=session.storage_path,
        resources=session.per_trial,
        max_concurrent_trials=exp.ray.max_concurrent_trials,
        callbacks=tuple(callbacks),
        verbose=1 if verbose >= 2 else 0,
        checkpoints_to_keep=exp.ray.checkpoints_to_keep,
    )


def fit_tracked(
    exp: Experiment,
    session: Session,
    build_tuner: Callable[[SweepSettings], Any],
    *,
    metric: str,
    iterations: int,
    trial_row: Callable[[Any], dict[str, Any]],
    log_results: Callable[..., None],
    format_table: Callable[[list[dict[str, Any]]], str],
    callbacks: list[Any] | None,
    verbose: int,
    started: float,
) -> list[dict[str, Any]]:
    """The part of a grid-style capability's ``run`` after :func:`open_session`: a child MLflow run per trial, a
    compact progress line per result (``verbose`` 1), ``tuner.fit()``, one row per trial, the parent run's
    plots and files (``log_results``), the summary table, and the end of the sweep (:class:`SweepEnd`).
    ``build_tuner(sweep)``: the capability's Tuner, given the :func:`sweep_settings` of this session."""
    trial_callback = tracking.MLflowTrialCallback(session.opening)
    progress = []
    if verbose == 1:
        from metaopt.progress import ProgressPrinter

        progress = [ProgressPrinter(metric, "max", iterations)]
    with SweepEnd(exp, session, trial_callback, iterations, started) as end:
        tuner = build_tuner(sweep_settings(session, exp, [trial_callback, *progress, *(callbacks or [])], verbose))
        results = tuner.fit()
        end.conclude(results)
        rows = [trial_row(result) for result in results]
        log_results(session.parent, rows, exp)
        print(format_table(rows), flush=True)
    return rows
