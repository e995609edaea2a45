"""The local embedded Ray as `metaopt run` starts it: worker niceness, and torch imported before a worker
connects to Ray (metaopt.worker_start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from metaopt.config import RayConfig
from metaopt.runtime import local_ray_options
from metaopt.worker_start import PRELOADED_ENV


def test_local_ray_workers_run_at_the_configured_niceness(ray_session):
    """The embedded Ray runs its workers at ``ray.worker_niceness`` (default 0), not at Ray's own 15."""
    assert local_ray_options(RayConfig(worker_niceness=7))["_system_config"] == {
        "worker_niceness": 7,
        "prestart_worker_first_driver": False,
    }
    assert ray_session.get(ray_session.remote(lambda: os.nice(0)).remote()) == RayConfig().worker_niceness == 0


def test_local_ray_starts_its_workers_with_torch_imported_before_ray(ray_session, tmp_path):
    """Default ``ray.worker_preload: [torch]``: a task's worker and a Tune trial's (Tune gives its actors a
    runtime_env of their own, which must keep the job's ``py_executable``) imported torch before Ray."""
    from ray import tune

    def import_order() -> tuple[str | None, bool | None]:  # nested: Ray ships it by value
        """In a Ray worker: what metaopt.worker_start preloaded, and whether torch was imported before Ray."""
        from metaopt.worker_start import imported_before_ray

        return os.environ.get(PRELOADED_ENV), imported_before_ray("torch")

    assert "runtime_env" not in local_ray_options(RayConfig(worker_preload=[]))
    command = local_ray_options(RayConfig())["runtime_env"]["py_executable"]
    assert command.endswith("/metaopt/worker_start.py torch") and command.startswith(sys.executable)
    assert ray_session.get(ray_session.remote(import_order).remote()) == ("torch", True)

    def trainable(config):
        preloaded, torch_first = import_order()
        tune.report({"preloaded": preloaded, "torch_first": torch_first})

    result = tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()[0]
    assert result.error is None and (result.metrics["preloaded"], result.metrics["torch_first"]) == ("torch", True)


def test_preloaded_torch_takes_the_thread_count_ray_gives_each_task(ray_session):
    """torch loads before Ray sets OMP_NUM_THREADS for a task; worker_start passes Ray's count on to torch, so
    a 1-CPU task or actor gets 1 torch thread (not one per core) and a 2-CPU task 2, as without the preload."""

    def torch_threads():
        import torch

        return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    @ray_session.remote(num_cpus=1)
    class OneCPU:
        def __init__(self):
            self.at_creation = torch_threads()

        def threads(self):
            return self.at_creation, torch_threads()

    one, two = (ray_session.remote(num_cpus=n)(torch_threads) for n in (1, 2))
    assert ray_session.get(one.remote()) == (1, "1")
    assert ray_session.get(two.remote()) == (2, "2")
    actor = OneCPU.remote()
    assert ray_session.get(actor.threads.remote()) == ((1, "1"), (1, "1"))
    ray_session.kill(actor)


def test_worker_start_preloads_then_runs_the_worker_script_as_python_would(tmp_path):
    """Modules first (one that cannot be imported is reported and skipped; the working directory cannot shadow
    them), then the script with its own arguments and its directory first on sys.path."""
    from metaopt import worker_start

    script = tmp_path / "worker.py"
    script.write_text(
        "import colorsys, json, os, sys\n"
        f"print(json.dumps({{'argv': sys.argv, 'path': sys.path, 'preloaded': os.environ['{PRELOADED_ENV}'],"
        " 'colorsys_from_stdlib': not colorsys.__file__.startswith(os.getcwd()), 'name': __name__}))\n"
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "colorsys.py").write_text("raise RuntimeError('the working directory shadowed colorsys')\n")
    run = subprocess.run(
        [
            sys.executable,
            worker_start.__file__,
            "colorsys,no_such_module_xyz",
            str(script),
            "--node-ip-address=127.0.0.1",
            "two words",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=elsewhere,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    path = seen.pop("path")  # importing Ray (worker_start wraps one of its functions) puts its vendored folder first
    assert seen == {
        "argv": [str(script), "--node-ip-address=127.0.0.1", "two words"],
        "preloaded": "colorsys",
        "colorsys_from_stdlib": True,
        "name": "__main__",
    }
    assert str(tmp_path) in path and str(elsewhere) not in path and os.path.dirname(worker_start.__file__) not in path
    assert path.index(str(tmp_path)) < min(i for i, p in enumerate(path) if p.endswith("site-packages"))
    assert "worker preload: cannot import no_such_module_xyz: ModuleNotFoundError" in run.stderr
