"""Ray core's private internals, behind one door (written against ``ray==2.60.*``).

What we take from Ray beyond its public API, each with a plain fallback on other versions:

- ``system_config``: ``ray.init(_system_config=...)`` sets the local workers' niceness and turns off the idle
  workers Ray prestarts for the driver (:func:`metaopt.runtime.local_ray_options` says why). Fallback: Ray's
  defaults (workers at niceness 15, prestarted idle workers): trials train measurably slower on a loaded 2-core
  machine (benchmarks/worker_speed.py measures the niceness; latest figure in benchmarks/README.md).
- ``single_node_switch``: Ray's private constant ``ray_constants.ENABLE_RAY_CLUSTER`` and the environment variable
  named by ``ENABLE_RAY_CLUSTERS_ENV_VAR`` make the embedded Ray listen on loopback only
  (:func:`metaopt.runtime.loopback_only`). Fallback: Ray's default addresses.
- ``follow_omp_thread_count``: wraps ``ray._private.utils.set_omp_num_threads_if_unset``, the step in which a Ray
  worker sets ``OMP_NUM_THREADS`` for each task, so torch (preloaded before Ray, :mod:`metaopt.worker_start`)
  gets the same count. Fallback: nothing wrapped; the worker start gives torch 1 thread unless
  ``OMP_NUM_THREADS`` is set (Ray's value for a 1-CPU task).
- ``auth_token_exists`` / ``reload_auth_mode``: Ray's C++ token lookup and config re-read
  (``ray._raylet.AuthenticationTokenLoader``, ``ray._raylet.Config``), for
  :func:`metaopt.jobs.enable_token_auth_if_available`.
  Fallback: the same lookup in Python (``RAY_AUTH_TOKEN``, the file at ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``)
  and no re-read (Ray reads ``RAY_AUTH_MODE`` when it first needs it, after we set it, in a fresh CLI process).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metaopt.compat import private_api_usable, version_matches, warn_fallback

WRITTEN_FOR = "==2.60.*"
"""The Ray versions (``ray`` distribution) whose private internals this module uses."""


def _module_or_none(name: str) -> Any:
    """A private Ray module (typed Any: its names are the private ones we check for), or None where this Ray
    release has no such module."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def system_config(worker_niceness: int) -> dict[str, Any]:
    """``ray.init`` keyword arguments for the local workers' niceness and no prestarted workers; {} elsewhere."""
    if version_matches("ray", WRITTEN_FOR):
        return {"_system_config": {"worker_niceness": worker_niceness, "prestart_worker_first_driver": False}}
    warn_fallback(
        "ray.system_config",
        f"metaopt.compat.ray: ray.init's private _system_config is not used on this Ray version (written for "
        f"ray{WRITTEN_FOR}): local workers keep Ray's niceness 15 and its prestarted idle workers (slower)",
    )
    return {}


@contextmanager
def single_node_switch() -> Iterator[bool]:
    """Inside the block, a Ray started here binds to loopback; yields whether the switch was available."""
    ray_constants = _module_or_none("ray._private.ray_constants")
    if ray_constants is None or not private_api_usable(
        "ray", WRITTEN_FOR, (ray_constants, "ENABLE_RAY_CLUSTER"), (ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR")
    ):
        import ray

        warn_fallback(
            "ray.single_node_switch",
            f"Ray {ray.__version__} has no single-node switch we know (written for ray{WRITTEN_FOR}); "
            "the local Ray listens on Ray's default addresses",
        )
        yield False
        return
    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_constant = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield True
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def follow_omp_thread_count(on_set: Callable[[int], None]) -> bool:
    """After Ray sets ``OMP_NUM_THREADS`` for a task in this worker, call ``on_set`` with the count.

    False (and nothing wrapped) where this Ray has no such step: the caller picks a thread count itself.
    """
    ray_utils = _module_or_none("ray._private.utils")
    if ray_utils is None or not private_api_usable("ray", WRITTEN_FOR, (ray_utils, "set_omp_num_threads_if_unset")):
        warn_fallback(
            "ray.follow_omp_thread_count",
            f"metaopt.compat.ray: cannot follow Ray's per-task OMP_NUM_THREADS on this Ray version (written "
            f"for ray{WRITTEN_FOR}); preloaded torch uses 1 thread unless OMP_NUM_THREADS is set",
        )
        return False
    ray_default = ray_utils.set_omp_num_threads_if_unset

    def set_omp_num_threads_and_follow(*args: Any, **kwargs: Any) -> bool:
        changed = ray_default(*args, **kwargs)
        if changed:
            on_set(int(os.environ["OMP_NUM_THREADS"]))
        return changed

    ray_utils.set_omp_num_threads_if_unset = set_omp_num_threads_and_follow
    return True


def _raylet_auth() -> Any | None:
    """Ray's ``_raylet`` module where it has the token loader and config we use; None elsewhere."""
    raylet = _module_or_none("ray._raylet")
    if raylet is None:
        return None
    usable = private_api_usable("ray", WRITTEN_FOR, (raylet, "AuthenticationTokenLoader"), (raylet, "Config"))
    if not usable:
        warn_fallback(
            "ray.auth",
            f"metaopt.compat.ray: Ray's token loader is not used on this Ray version (written for "
            f"ray{WRITTEN_FOR}); looking for the token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token",
        )
    return raylet if usable else None


def token_in_usual_places(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Ray's documented token lookup, in Python: ``RAY_AUTH_TOKEN``, else the file at ``RAY_AUTH_TOKEN_PATH``,
    else ``~/.ray/auth_token``; a non-empty value counts."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = (
        Path(environ["RAY_AUTH_TOKEN_PATH"])
        if environ.get("RAY_AUTH_TOKEN_PATH")
        else Path.home() / ".ray" / "auth_token"
    )
    try:
        return bool(path.expanduser().read_text().strip())
    except OSError:
        return False


def auth_token_exists() -> bool:
    """Whether a Ray auth token is available to this process, whatever ``RAY_AUTH_MODE`` says."""
    raylet = _raylet_auth()
    if raylet is None:
        return token_in_usual_places()
    return bool(raylet.AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))


def reload_auth_mode() -> None:
    """Make Ray re-read ``RAY_AUTH_MODE`` (its C++ config caches it on first read), the way ``ray.init`` does."""
    raylet = _raylet_auth()
    if raylet is not None:
        raylet.Config.initialize("")
