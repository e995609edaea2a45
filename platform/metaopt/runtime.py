"""Ray at the edge: the same experiment runs on an embedded local Ray or on a cluster.

Address resolution: ``--address`` on the command line, else ``ray.address`` in the file, else the
``RAY_ADDRESS`` environment variable (set by Ray Jobs when the experiment was submitted), else a local
embedded Ray sized by ``ray.num_cpus``/``ray.num_gpus``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray

from metaopt import user_code
from metaopt.compat import ray as compat_ray
from metaopt.config import RayConfig


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float
    nodes: int
    address: str

    def describe(self) -> str:
        return f"Ray at {self.address}: {self.nodes} node(s), {self.cpus:g} CPU, {self.gpus:g} GPU"


def resolve_address(cli_address: str | None, config: RayConfig) -> str | None:
    for candidate in (cli_address, config.address, os.environ.get("RAY_ADDRESS")):
        if candidate and candidate != "local":
            return candidate
    return None


def local_ray_options(config: RayConfig) -> dict:
    """``ray.init`` arguments that start the local embedded Ray: its size, no dashboard, the workers'
    niceness, no prestarted workers, and the modules its workers import before they connect to Ray.

    Niceness: Ray starts workers at niceness 15 so that its control plane stays responsive on a loaded node;
    on a 2-core machine that also lets the raylet, the GCS, the driver and every idle actor's timers preempt the
    trials. Side by side with a plain process doing the same digits steps, a Ray worker at niceness 15 lost a
    clear share of its throughput and one at 0 stayed near parity (benchmarks/worker_speed.py measures it; latest
    figure in benchmarks/README.md, every run in benchmarks/results.csv).

    Preload (``ray.worker_preload``, default torch; not on Windows, where Ray does not start workers through a
    POSIX shell): every worker is started by :mod:`metaopt.worker_start`, which imports torch before the worker
    script connects to Ray; torch imported after that trains slower (see there). Job-wide, so Tune's trainables,
    which get a ``runtime_env`` of their own, keep it.

    No prestarted workers: Ray starts one idle Python worker per CPU when the driver connects, for the driver's
    first tasks and actors. metaopt's trials never land on them: Tune creates every trainable actor with its own
    ``runtime_env`` (``PL_DISABLE_FORK`` in ``ray.tune.execution.class_cache``), and actors created inside a trial
    inherit it, so the raylet starts fresh workers for them. The prestarted ones only imported Ray while the
    first trials start, on the same cores, then woke up idle for the whole sweep (``ray::IDLE``: hundreds of
    context switches and CPU time taken from the trials in a short sweep on 2 cores; the figures, measured during
    benchmarks/pbt_overhead.py sweeps, are in benchmarks/results.csv)."""
    options = {
        "num_cpus": config.num_cpus,
        "num_gpus": config.num_gpus,
        "include_dashboard": False,
        **compat_ray.system_config(config.worker_niceness),
    }
    if config.worker_preload and sys.platform != "win32":
        options["runtime_env"] = {"py_executable": worker_start_command(config.worker_preload)}
    return options


def worker_start_command(modules: list[str]) -> str:
    """The shell command Ray starts each local worker with (``runtime_env`` ``py_executable``; Ray appends the
    worker script and its arguments): this Python, importing ``modules`` before the worker connects to Ray.
    See :mod:`metaopt.worker_start` for why."""
    from metaopt import worker_start

    script = shlex.quote(os.path.abspath(worker_start.__file__))
    return f"{shlex.quote(sys.executable)} {script} {shlex.quote(','.join(modules))}"


@contextmanager
def loopback_only() -> Iterator[None]:
    """While Ray starts inside this block, its node address is this machine's loopback, so the embedded Ray's
    GCS, raylet, agents and workers listen on 127.0.0.1 (``::1`` on IPv6-only hosts), not on every interface.

    Why this way: on Linux Ray takes the node address from the routable interface and binds its servers there
    or to the wildcard, and ``ray.init(_node_ip_address="127.0.0.1")`` does not help: Ray turns a loopback
    address back into the routable one (``services.resolve_ip_for_localhost``). Its one switch is the one it
    uses on macOS and Windows: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` ``get_node_ip_address`` answers
    the loopback address. Ray reads that variable into a constant when imported, so both the constant (this
    process) and the variable (the processes ``ray.init`` starts, and the workers they start) are set; both are
    restored afterwards, so a later ``ray.init(address=...)`` to a real cluster sees Ray's normal behaviour.
    """
    with compat_ray.single_node_switch():  # a Ray release without it: Ray's default binding, said once
        yield


def start_local(config: RayConfig, log_to_driver: bool = True) -> None:
    """Start the embedded local Ray (:func:`local_ray_options`), reachable only from this machine
    (:func:`loopback_only`)."""
    with loopback_only():
        ray.init(**local_ray_options(config), log_to_driver=log_to_driver)


def init(config: RayConfig, cli_address: str | None = None) -> Resources:
    """Connect to (or start) Ray once per process and report what it offers.

    The workers import the user's ``module:function`` references from the directory this process is in when Ray
    starts (:func:`workers_user_dir`, :func:`user_dir_runtime_env`). Workers of a Ray already running in this
    process keep the directory they were started with: after changing directory in a notebook, call
    ``ray.shutdown()`` before running an experiment of another folder."""
    address = resolve_address(cli_address, config)
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True, **user_dir_runtime_env(address))
        else:
            with workers_user_dir(os.getcwd()):  # the embedded Ray's raylet, and so its workers, inherit it
                start_local(config)
    total = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return Resources(
        cpus=float(total.get("CPU", 0)),
        gpus=float(total.get("GPU", 0)),
        nodes=nodes,
        address=address or "local",
    )


def workers_user_dir(folder: str) -> contextlib.AbstractContextManager[None]:
    """:data:`~metaopt.user_code.USER_DIR_VARIABLE` is ``folder`` while Ray starts here (the processes it starts
    keep it), and what it was afterwards: this process keeps taking the user's directory from where it is now, so
    a notebook that moves to another project imports that project's modules."""
    return user_code.from_dir(folder)


def user_dir_runtime_env(address: str) -> dict[str, Any]:
    """``ray.init`` arguments for a driver joining a running cluster at ``address``, so its workers import the
    user's ``module:function`` references (:mod:`metaopt.user_code`):

    - inside a submitted job, none: the job's own working directory (uploaded by ``metaopt submit``) serves, and a
      second runtime_env would replace the job's;
    - a cluster on this machine (a loopback address), the directory the user ran in, by its path;
    - any other cluster, whose nodes do not have this machine's files: the directory uploaded as the job's
      ``working_dir``, minus :data:`metaopt.jobs.EXCLUDES` (as ``metaopt submit`` uploads it); each worker starts
      in its copy (Tune's trials find it through :data:`~metaopt.user_code.TUNE_START_DIR_VARIABLE`)."""
    from metaopt import jobs

    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return {}
    folder = os.getcwd()
    if jobs.is_loopback(address):
        return {"runtime_env": {"env_vars": {user_code.USER_DIR_VARIABLE: folder}}}
    return {"runtime_env": {"working_dir": folder, "excludes": list(jobs.EXCLUDES)}}


def trial_resources(config: RayConfig, available: Resources) -> dict[str, float]:
    """Per-trial resource request; asking for GPUs the cluster does not have is an error, not a hang."""
    from metaopt.errors import ConfigError

    if config.gpus_per_trial > 0 and available.gpus == 0:
        raise ConfigError(
            "ray.gpus_per_trial",
            f"{config.gpus_per_trial:g} GPU(s) per trial requested but the Ray cluster has none "
            "(set it to 0 for CPU, or submit to a GPU cluster)",
        )
    if config.cpus_per_trial > available.cpus:
        raise ConfigError(
            "ray.cpus_per_trial",
            f"{config.cpus_per_trial:g} CPUs per trial requested but the cluster has {available.cpus:g}",
        )
    return {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}


def with_worker_bundles(
    per_trial: dict[str, float], workers: int, cpus_per_worker: float, gpus_per_worker: float = 0.0
):
    """A trial's resources plus one placement-group bundle per helper worker (Ray actors or tasks it starts),
    so the cluster reserves and co-schedules them with the trial; just ``per_trial`` when there are none."""
    if not workers:
        return per_trial
    from ray import tune

    bundles = [{"CPU": per_trial["cpu"], "GPU": per_trial["gpu"]}]
    bundles += [{"CPU": cpus_per_worker, "GPU": gpus_per_worker}] * workers
    return tune.PlacementGroupFactory(bundles)
