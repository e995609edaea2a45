"""Start a Ray worker process with the trials' heavy libraries imported before Ray connects it.

    python -m metaopt.worker_start MODULES WORKER_SCRIPT [ARGS ...]

``MODULES`` is a comma-separated list (``torch``); ``WORKER_SCRIPT`` and ``ARGS`` are what Ray would have run
(its ``default_worker.py`` and the raylet's arguments). The local embedded Ray starts its workers this way
(``runtime_env={"py_executable": ...}``, :func:`metaopt.runtime.local_ray_options`) when ``ray.worker_preload``
names modules.

Why: in a process where Ray's core worker started *before* torch was imported, the digits MLP's forward +
backward ran 10-20% slower than where torch came first (measured on the 2-core development machine: a plain
process that connects to Ray as a driver before importing torch, and a Ray actor, both slower; the same process
importing torch first, at parity with a process without Ray). Forward alone was at parity, the process was on
its CPU the whole time, and a profile had the same shape, only slower; why, we have not pinned down. A Ray
worker connects to Ray before it runs any user code, so every Tune trial imported torch late. Importing it
here, before the worker script imports Ray, gives the trials a plain process's speed (benchmarks/worker_speed.py
and pbt_overhead.py measure it). The price: a worker that never uses torch imports it anyway (1.5-2 CPU-s at
start-up; ``ray.worker_preload: []`` turns it off). A module that cannot be imported is reported on stderr and
skipped: the worker still starts, and the trial's own import raises the real error where it can be seen.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys

PRELOADED_ENV = "METAOPT_WORKER_PRELOADED"  # set in the worker: the modules it imported before Ray


def preload(modules: list[str]) -> list[str]:
    """Import each module; the ones that imported."""
    done = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 -- never stop a worker from starting; the trial's import says why
            print(f"[metaopt] worker preload: cannot import {name}: {type(err).__name__}: {err}", file=sys.stderr)
        else:
            done.append(name)
    return done


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m metaopt.worker_start MODULES WORKER_SCRIPT [ARGS ...]")
    modules, script = [m for m in argv[0].split(",") if m], argv[1]
    os.environ[PRELOADED_ENV] = ",".join(preload(modules))
    # As `python WORKER_SCRIPT ARGS` would have it: the script's arguments and its directory first on the path.
    sys.argv = [script, *argv[2:]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
