"""Start a Ray worker process with the trials' heavy libraries imported before Ray connects it.

    python PATH/TO/metaopt/worker_start.py MODULES WORKER_SCRIPT [ARGS ...]

``MODULES`` is a comma-separated list (``torch``); ``WORKER_SCRIPT`` and ``ARGS`` are what Ray would have run
(its ``default_worker.py`` and the raylet's arguments). The local embedded Ray starts its workers this way
(``runtime_env={"py_executable": ...}``, :func:`metaopt.runtime.local_ray_options`) when ``ray.worker_preload``
names modules. Run by its path, not ``-m``: it needs only the standard library (and, after the preload,
:mod:`metaopt.compat.ray`, loaded from this file's own package where ``metaopt`` is importable only through the
driver's ``sys.path``), and the working directory never lands on ``sys.path``. Before the preload,
``sys.path[0]`` is already the worker script's directory, as ``python WORKER_SCRIPT`` has it, so nothing in
this folder or the working directory shadows what torch imports.

Threads: torch's OpenMP reads ``OMP_NUM_THREADS`` when it loads, and Ray sets that variable only when a task
starts (to the task's CPUs, if unset), which is now after the preload. So Ray's own per-task step (private:
:func:`metaopt.compat.ray.follow_omp_thread_count` wraps it) passes the count it sets on to
``torch.set_num_threads``: a worker's torch threads are what Ray would have given it. On a Ray release where
that step is not usable, torch gets 1 thread unless ``OMP_NUM_THREADS`` is set: Ray's value for a 1-CPU task.
Ray's ``uv run`` hook replaces ``py_executable``, so under ``uv run`` nothing is preloaded.

Why: in a process where Ray's core worker started *before* torch was imported, the digits MLP's forward +
backward ran measurably slower than where torch came first (probed on the 2-core development machine: a plain
process that connects to Ray as a driver before importing torch, and a Ray actor, both slower; the same process
importing torch first, at parity with a process without Ray). Forward alone was at parity, the process was on
its CPU the whole time, and a profile had the same shape, only slower; why, we have not pinned down. A Ray
worker connects to Ray before it runs any user code, so every Tune trial imported torch late. Importing it
here, before the worker script imports Ray, gives the trials a plain process's speed (benchmarks/worker_speed.py
and pbt_overhead.py measure it; latest figures in benchmarks/README.md, the probes' in benchmarks/results.csv).
The price: a worker that never uses torch imports it anyway (CPU-seconds at start-up; ``ray.worker_preload: []``
turns it off). A module that cannot be imported is reported on stderr and skipped: the worker still starts, and
the trial's own import raises the real error where it can be seen.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import runpy
import sys
from types import ModuleType

PRELOADED_ENV = "METAOPT_WORKER_PRELOADED"  # set in the worker: the modules it imported before Ray


def imported_before_ray(module: str = "torch") -> bool | None:
    """In a running process: was ``module`` imported before Ray's core (``ray._raylet``)? None where Ray is not
    imported; False where ``module`` is not (``sys.modules`` keeps import order). What the preload is for."""
    modules = list(sys.modules)
    if "ray._raylet" not in modules:
        return None
    return module in modules and modules.index(module) < modules.index("ray._raylet")


def preload(modules: list[str]) -> list[str]:
    """Import each module; the ones that imported."""
    done = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # never stop a worker from starting; the trial's import says why
            print(f"[metaopt] worker preload: cannot import {name}: {type(err).__name__}: {err}", file=sys.stderr)
        else:
            done.append(name)
    return done


def follow_rays_thread_count() -> bool:
    """Make torch use the OpenMP thread count Ray sets for each task (see the module docstring); False where
    this Ray has no such step to wrap, or where anything on the way fails (said in one line on stderr): the
    worker then starts with the fallback thread count, as on a Ray release without that step."""

    def set_torch_threads(count: int) -> None:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(count)

    try:
        return compat_ray_module().follow_omp_thread_count(set_torch_threads)
    except Exception as err:  # never stop a worker from starting
        reason = (str(err).splitlines() or [""])[0]
        print(
            f"[metaopt] worker start: cannot follow Ray's thread count: {type(err).__name__}: {reason}", file=sys.stderr
        )
        return False


def compat_ray_module() -> ModuleType:
    """:mod:`metaopt.compat.ray`; where ``metaopt`` is not on this worker's path, from the package this file is in
    (found by this file's location, not by adding its folder to ``sys.path``)."""
    try:
        return importlib.import_module("metaopt.compat.ray")
    except ModuleNotFoundError as err:
        if err.name != "metaopt":
            raise
    package_dir = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "metaopt", os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["metaopt"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("metaopt.compat.ray")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python worker_start.py MODULES WORKER_SCRIPT [ARGS ...]")
    modules, script = [m for m in argv[0].split(",") if m], argv[1]
    # As `python WORKER_SCRIPT ARGS` would have it, before anything is imported: the script's arguments, and
    # its directory in place of this one first on the path (unless -P / PYTHONSAFEPATH keeps it off).
    sys.argv = [script, *argv[2:]]
    if not sys.flags.safe_path:
        sys.path[0] = os.path.dirname(os.path.abspath(script))
    os.environ[PRELOADED_ENV] = ",".join(preload(modules))  # before anything imports Ray
    torch = sys.modules.get("torch")
    if not follow_rays_thread_count() and torch is not None and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # what Ray would give a 1-CPU task
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
