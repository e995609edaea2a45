"""metaopt from Python: ``metaopt.run(experiment)`` and one function per capability, taking Python objects.

Everything an experiment file says, a Python call says too, with the researcher's own code passed as objects::

    import metaopt
    from metaopt.api import pbt

    result = metaopt.run("experiments/quickstart_tiny.yaml")   # a file, a dict or a typed Experiment
    result = pbt(task=make_task, population=4, iterations=8)   # the pbt: section's fields as keywords
    result.rows, result.best, result.run_id, result.trial_run_ids, result.table, result.complete

(``metaopt.pbt`` is the capability's package; the functions that run a capability live here.)

A capability function builds the experiment's section from its keywords (the section's own field names, see each
capability's ``config.py``) and turns every Python object in them into a reference
(:func:`metaopt.user_code.reference_to`): a function importable by name becomes ``module:qualname``, anything else
(a lambda, a function defined in a notebook or a test) is written with cloudpickle under ``.metaopt/objects/`` and
named ``pickle:<path>``; a dataset given as arrays (``dataset=(x, y)`` or ``{"x": x, "y": y}``) is written as an
``.npz`` file with keys ``x`` and ``y`` there. The experiment is then validated exactly as ``metaopt run`` validates
a file, user code imported and its signature checked, before Ray starts.

Your modules are imported from the current directory, and imported again when their file changed (edit a module,
run again). A Ray already running in this process keeps the directory its workers were started from: after
``os.chdir`` to another project, ``ray.shutdown()`` first (:func:`metaopt.runtime.init`).

A PBT sweep of a task given as an in-memory object is replayed from Python: :func:`replay`.

Errors: bad input raises :class:`~metaopt.errors.ConfigError` (the one line ``metaopt run`` prints, as an exception
instead of exit code 2). A sweep that ran to its end returns a :class:`Result` whether or not every trial succeeded:
``result.complete`` is False and ``result.failed`` names the failed trials when one did not (``result.exit_code``
is then 1, as ``metaopt run``'s). A sweep stopped before its trials finished (Ctrl-C, trials Tune stopped early)
raises :class:`metaopt.session.SweepStopped`, a :class:`KeyboardInterrupt`, once its partial results are logged;
its ``outcome`` says how far it got. Nothing partial ever looks complete.

This is the top layer, beside ``cli``: it reaches capabilities through the registry (and pbt's replay, which
is a verb of its own, by name).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import math
import numbers
import os
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaopt import config, user_code
from metaopt.config import Experiment
from metaopt.errors import ConfigError

#: Where the Python API writes the objects it names (pickles and arrays), relative to the current directory.
OBJECTS_FOLDER = user_code.OBJECTS_FOLDER


@dataclass
class Result:
    """What one experiment run from Python produced.

    ``rows``: one dict per trial (the printed table's trials); ``best``: the best trial as a dict (pbt: its lr
    ``schedule``; lpo: its ``drift_dir``; federated/posttrain: the trial row with the highest ``final_*`` score),
    None when the runner names none; ``run_id``: the sweep's MLflow run, ``trial_run_ids``: trial id -> its MLflow
    run, both in ``mlflow_experiment`` at ``tracking_uri``; ``table``: the summary table as printed; ``output``:
    everything the run printed on this thread; ``summary``: what the capability's runner returned, untouched.
    ``status`` is the sweep run's MLflow status (FINISHED, or FAILED when a trial failed: ``failed`` lists
    (trial id, first error line)); ``exit_code`` is what ``metaopt run`` would exit with."""

    kind: str
    name: str
    mlflow_experiment: str
    tracking_uri: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    run_id: str | None
    trial_run_ids: dict[str, str]
    status: str
    exit_code: int
    failed: list[tuple[str, str]]
    table: str
    output: str = field(repr=False)
    summary: Any = field(repr=False)

    @property
    def complete(self) -> bool:
        """Every trial ran to its end without error."""
        return self.exit_code == 0


def run(
    experiment: str | os.PathLike[str] | Mapping[str, Any] | Experiment,
    *,
    address: str | None = None,
    overrides: Iterable[str] = (),
    verbose: int = 1,
) -> Result:
    """Run an experiment: a YAML file's path, a mapping as read from YAML (Python objects in it become references,
    as in the capability functions), or a typed :class:`~metaopt.config.Experiment`. ``overrides`` are
    ``--set``'s ``a.b=value`` strings; ``address`` is ``--address``; ``verbose`` 0/1/2 as ``--quiet``/default/
    ``--verbose``. Raises ConfigError on bad input, before Ray starts; see the module for what a stopped sweep
    does."""
    return execute(load(experiment, overrides=overrides), address=address, verbose=verbose)


def load(
    experiment: str | os.PathLike[str] | Mapping[str, Any] | Experiment, *, overrides: Iterable[str] = ()
) -> Experiment:
    """The validated Experiment :func:`run` would run (user code imported and checked here, nothing started)."""
    overrides = list(overrides)
    for override in overrides:  # text, like a file's: never a pickle: reference
        if user_code.PICKLE_PREFIX in override.partition("=")[2]:
            raise ConfigError("--set", "a pickle: reference is written by metaopt's Python API; pass the object")
    if isinstance(experiment, (str, os.PathLike)):
        return config.load(experiment, overrides)
    if isinstance(experiment, Experiment):
        raw = experiment.to_dict()
        source = experiment.source
    elif isinstance(experiment, Mapping):
        refuse_pickle_references(experiment)
        raw = to_references(dict(experiment))
        source = None
    else:
        raise ConfigError("experiment", f"must be a path, a mapping or an Experiment (got {type(experiment).__name__})")
    raw = copy.deepcopy(raw)
    for override in overrides:
        config.apply_override(raw, override)
    return config.from_dict(raw, source=source, check_paths=True, python_objects=True)


def experiment(
    kind: str,
    *,
    name: str | None = None,
    description: str = "",
    ray: Mapping[str, Any] | None = None,
    tracking: Mapping[str, Any] | None = None,
    **section: Any,
) -> Experiment:
    """The validated Experiment of ``kind`` whose section holds ``section`` (Python objects become references;
    ``name`` defaults to ``<kind>-python``)."""
    raw: dict[str, Any] = {"name": name or f"{kind}-python", "kind": kind, "description": description}
    if ray is not None:
        raw["ray"] = dict(ray)
    if tracking is not None:
        raw["tracking"] = dict(tracking)
    raw[kind] = section
    return load(raw)


def run_kind(
    kind: str,
    *,
    name: str | None = None,
    description: str = "",
    ray: Mapping[str, Any] | None = None,
    tracking: Mapping[str, Any] | None = None,
    address: str | None = None,
    verbose: int = 1,
    **section: Any,
) -> Result:
    """Run an experiment of any installed kind from its section's fields (what each capability function does)."""
    exp = experiment(kind, name=name, description=description, ray=ray, tracking=tracking, **section)
    return execute(exp, address=address, verbose=verbose)


def pbt(**fields: Any) -> Result:
    """Population-based learning-rate adaptation (``kind: pbt``; Jaderberg et al. 2017; PB2, Parker-Holder et al.
    2020). Signature: ``pbt(*, name=None, description="", ray=None, tracking=None, address=None, verbose=1,
    **section)`` with the ``pbt:`` section's fields: ``task`` (a built-in name, or your factory
    ``make_task(options: dict, optimizer, seed) -> TrainingTask``), ``task_options``, ``optimizer``,
    ``scheduler`` (pbt, pb2, random, grid), ``population``, ``iterations``, ``steps_per_iteration``,
    ``perturbation_interval``, ``quantile_fraction``, ``resample_probability``, ``perturbation_factors``,
    ``synch``, ``even_finish``, ``lr_min``, ``lr_max``, ``seed``, ``max_failures``, ``checkpoint_interval``.
    ``result.best["schedule"]`` is the best lineage's lr schedule, [(step, lr), ...]."""
    return run_kind("pbt", **fields)


def federated(**fields: Any) -> Result:
    """Federated learning with server-side lr adaptation (``kind: federated``; FedAvg, FedAdam, FedExp, FedHyper).
    Signature: ``federated(*, name=None, description="", ray=None, tracking=None, address=None, verbose=1,
    **section)`` with the ``federated:`` section's fields: ``dataset`` (a built-in name, arrays ``(x, y)`` --
    written as an .npz with keys x, y -- or your loader returning (x, y)), ``data_root``, ``num_clients``,
    ``partition``, ``alpha``, ``fraction``, ``rounds``, ``local_epochs``, ``client_optimizer``, ``batch_size``,
    ``hidden``, ``val_fraction``, ``strategies``, ``lrs``, ``seeds``, ``cpus_per_client``, ``gpus_per_client``,
    ``scheduler``, ``pbt_interval``, ``max_failures``, ``round_timeout_s`` and the others of
    metaopt/federated/config.py. ``result.best`` is the trial row with the highest final accuracy."""
    return run_kind("federated", **fields)


def learned_objective(**fields: Any) -> Result:
    """Meta-train a learned RL objective (drift) with evolution strategies (``kind: lpo``; LPO, Lu et al. 2022;
    TA-LPO, Goldie et al. 2024). Signature: ``learned_objective(*, name=None, description="", ray=None,
    tracking=None, address=None, verbose=1, **section)`` with the ``lpo:`` section's fields: ``drift`` (lpo,
    ta_lpo), ``hidden``, ``envs`` (a list of ``{"env": ..., "total_timesteps": ..., "ppo": {...}}``; ``env`` a
    gymnax id or your environment factory), ``horizons``, ``es`` (population, generations, sigma_*, lr*,
    antithetic, fitness_shaping), ``seeds_per_member``, ``baseline_seeds``, ``eval_every``, ``eval_seeds``,
    ``checkpoint_every``, ``workers``, ``cpus_per_worker``, ``gpus_per_worker``, ``meta_seeds``, ``max_failures``.
    ``result.best["drift_dir"]`` is the best meta-seed's exported drift."""
    return run_kind("lpo", **fields)


def symbolic(**fields: Any) -> Result:
    """Evolve an optimizer program (``kind: symbolic``; Chen et al. 2023, "Symbolic Discovery of Optimization
    Algorithms", which found Lion). Signature: ``symbolic(*, name=None, description="", ray=None, tracking=None,
    address=None, verbose=1, **section)`` with the ``symbolic:`` section's fields: ``start`` (adamw, lion or a
    program file), ``population``, ``tournament``, ``evaluations``, ``batch``, ``workers``, ``cpus_per_worker``,
    ``gpus_per_worker``, ``restart_every``, ``restart_after``, ``proxy`` (``{"task": ...,
    "task_options": ..., "steps": ..., "lrs": [...], "seeds": ...}``), ``funnel``, ``meta_validation``,
    ``funnel_top``, ``margin``, ``checkpoint_every``, ``seeds``, ``max_failures``. Each row holds its search's
    ``state`` (``state.best()``: the best program) and ``final`` (the programs the funnel accepted); ``result.best``
    is the row whose best program scored highest."""
    return run_kind("symbolic", **fields)


def posttrain(**fields: Any) -> Result:
    """GRPO post-training of a language-model policy under a curriculum (``kind: posttrain``; GRPO, Shao et al.
    2024; SEC, self-evolving curricula). Signature: ``posttrain(*, name=None, description="", ray=None,
    tracking=None, address=None, verbose=1, **section)`` with the ``posttrain:`` section's fields: ``model``,
    ``tasks``, ``curricula``, ``curriculum``, ``grpo``, ``warmup``, ``optimizer``, ``schedule``, ``roles``,
    ``steps``, ``steps_per_iteration``, ``eval_per_category``, ``eval_every``, ``seeds``, ``scheduler``,
    ``pbt_interval``, ``max_failures``, ``samples_to_log``. ``result.best`` is the trial row with the highest
    final accuracy."""
    return run_kind("posttrain", **fields)


def replay(source: str | os.PathLike[str], *, trial: str | None = None, tracking_uri: str | None = None) -> Any:
    """``metaopt replay`` from Python: train the sweep's task from scratch with a trial's lr schedule (default: the
    best trial's) and log it under the sweep's run. ``source``: a schedules.json file, or a sweep's MLflow run id
    in ``tracking_uri``. A sweep whose task was an in-memory Python object (a ``pickle:`` reference) replays only
    from here. Returns :class:`metaopt.pbt.replay.ReplayResult`."""
    from metaopt.pbt import replay as pbt_replay

    payload = pbt_replay.load_payload(os.fspath(source), tracking_uri, python_objects=True)
    result = pbt_replay.replay(payload, trial)
    uri = tracking_uri or payload["experiment"]["tracking"]["uri"]
    pbt_replay.log_replay(result, payload, uri)
    return result


# ------------------------------------------------------------------------------------------------ running


def execute(exp: Experiment, *, address: str | None = None, verbose: int = 1) -> Result:
    """Run a validated Experiment with its kind's runner and gather what it produced into a :class:`Result`."""
    from metaopt import session

    runner = config.runner_for(exp.kind)
    before = len(session.ended_sweeps())
    with PrintedText() as printed:
        summary = runner(exp, address=address, verbose=verbose)
    ended = session.ended_sweeps()[before:]
    outcome = ended[-1] if ended else None
    rows = [plain(item) for item in trial_items(summary)]
    return Result(
        kind=exp.kind,
        name=exp.name,
        mlflow_experiment=exp.mlflow_experiment,
        tracking_uri=exp.tracking.uri,
        rows=rows,
        best=best_of(summary, rows),
        run_id=outcome.run_id if outcome else None,
        trial_run_ids=dict(outcome.trial_runs) if outcome else {},
        status=outcome.status if outcome else "FINISHED",
        exit_code=max((o.exit_code for o in ended), default=0),
        failed=[(t.trial_id, t.error or "") for o in ended for t in o.failed],
        table=printed.table(),
        output=printed.text(),
        summary=summary,
    )


def trial_items(summary: Any) -> list[Any]:
    """The per-trial items of what a runner returned: its ``trials`` (pbt, lpo), else the list itself."""
    trials = getattr(summary, "trials", None)
    if isinstance(trials, list):
        return trials
    return list(summary) if isinstance(summary, (list, tuple)) else []


def plain(item: Any) -> dict[str, Any]:
    """A trial item as a dict: a dataclass's fields (one level, values as they are), a mapping copied."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    if isinstance(item, Mapping):
        return dict(item)
    return {"value": item}


def best_of(summary: Any, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The runner's own choice (``summary.best()``) when it makes one; else the error-free row with the highest
    ``final_*`` score (the grid runners' rows: ``final_accuracy``) or, for a program search, whose best program
    (``row["state"].best()``) scored highest; else None."""
    choose = getattr(summary, "best", None)
    if callable(choose):
        chosen = choose()
        return plain(chosen) if chosen is not None else None
    scored = []
    for row in rows:
        score = next((value for key, value in row.items() if key.startswith("final_")), None)
        if score is None and callable(getattr(row.get("state"), "best", None)):  # a search: its best program's score
            score = getattr(row["state"].best(), "score", None)
        if not row.get("error") and isinstance(score, numbers.Real) and math.isfinite(score):
            scored.append((score, row))
    return max(scored, key=lambda pair: pair[0])[1] if scored else None


class PrintedText(contextlib.AbstractContextManager):
    """Everything printed to ``sys.stdout`` while it is active still reaches the terminal, and what this thread
    printed is kept: the summary table is the last block it printed that is not a ``[metaopt]`` status line
    (every runner prints its table in one piece, after which only status lines follow)."""

    def __init__(self) -> None:
        self._thread = threading.get_ident()
        self._pieces: list[str] = []
        self._redirect: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> PrintedText:
        self._redirect = contextlib.redirect_stdout(_Tee(sys.stdout, self))
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        assert self._redirect is not None
        self._redirect.__exit__(*exc_info)

    def keep(self, text: str) -> None:
        if threading.get_ident() == self._thread:
            self._pieces.append(text)

    def text(self) -> str:
        return "".join(self._pieces)

    def table(self) -> str:
        blocks = [piece.strip("\n") for piece in self._pieces if piece.strip()]
        return next((block for block in reversed(blocks) if not block.startswith("[metaopt]")), "")


class _Tee(io.TextIOBase):
    """A stream writing to ``stream`` and to a :class:`PrintedText` (everything else asked of it: ``stream``'s)."""

    def __init__(self, stream: Any, printed: PrintedText):
        self._stream, self._printed = stream, printed

    def write(self, text: str) -> int:
        self._printed.keep(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# ------------------------------------------------------------------------------------ Python objects -> references


def to_references(value: Any, *, base: str | Path | None = None, where: str = "") -> Any:
    """``value`` with every Python object a YAML file could not hold made into something it can: arrays ``(x, y)``
    or ``{"x": x, "y": y}`` -> the path of an .npz (:func:`arrays_file`), numpy scalars -> numbers, paths -> str,
    any other non-JSON object (functions, classes, instances) -> a reference (:func:`user_code.reference_to`).
    Mappings, lists and tuples are walked (tuples become lists, as YAML gives them); ``where`` is the field path
    an error line names."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if is_number(value):
        return value.item()
    if is_dataset(value):
        return str(arrays_file(value, base=base, field=where or "dataset"))
    if isinstance(value, Mapping):
        return {key: to_references(item, base=base, where=_below(where, key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_references(item, base=base, where=_below(where, index)) for index, item in enumerate(value)]
    return user_code.reference_to(value, base=base)


def is_number(value: Any) -> bool:
    """A numpy (or other library's) scalar number, as YAML would hold it: one with ``item()``, not an array."""
    return isinstance(value, numbers.Number) and hasattr(value, "item")


def is_array(value: Any) -> bool:
    return hasattr(value, "__array__") and hasattr(value, "shape") and not isinstance(value, (str, bytes))


def is_dataset(value: Any) -> bool:
    """Arrays ``(x, y)`` (a pair) or ``{"x": x, "y": y, ...}`` (more arrays beside, e.g. ``groups``): a data set
    given in memory."""
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(is_array(item) for item in value)
    if isinstance(value, Mapping):
        return {"x", "y"} <= set(value) and all(isinstance(key, str) and is_array(item) for key, item in value.items())
    return False


def arrays_file(dataset: Any, *, base: str | Path | None = None, field: str = "dataset") -> Path:
    """Arrays ``(x, y)`` / ``{"x": x, "y": y, ...}`` written once as ``<base>/.metaopt/objects/<hash>.npz`` with
    keys ``x``, ``y`` (and the mapping's others), ``base`` default: the current directory; the same data, the same
    file."""
    import numpy as np

    named = dict(dataset) if isinstance(dataset, Mapping) else dict(zip(("x", "y"), dataset, strict=True))
    arrays = {key: np.asarray(array) for key, array in sorted(named.items())}
    for key, array in arrays.items():
        if array.ndim == 0:
            raise ConfigError(field, f"{key} must be an array with one entry per sample (got a scalar)")
        if len(array) != len(arrays["x"]):
            raise ConfigError(field, f"x and {key} must have as many samples (got {len(arrays['x'])} and {len(array)})")
    digest = hashlib.sha256()
    for key, array in arrays.items():
        digest.update(f"{key}{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    path = user_code.objects_folder(base) / f"{digest.hexdigest()[:20]}.npz"
    if path.exists():
        return path
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return user_code.write_once(path, buffer.getvalue())  # whole or absent, also with two writers


def refuse_pickle_references(value: Any, where: str = "") -> None:
    """A ``pickle:`` string the caller wrote is refused (one line naming where): only objects given to this API
    become pickle references, never text read from somewhere (a file read into a dict may come from anyone)."""
    if isinstance(value, str) and value.startswith(user_code.PICKLE_PREFIX):
        raise ConfigError(where, "a pickle: reference is written by metaopt's Python API; pass the Python object")
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        refuse_pickle_references(item, _below(where, key))


def _below(where: str, key: Any) -> str:
    """The field path one step below ``where``, as an error line writes it (``federated.dataset``)."""
    return ".".join(part for part in (where, config.field_part(key)) if part)
