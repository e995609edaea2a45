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
        "worker_niceness": 7, "prestart_worker_first_driver": False}
    assert ray_session.get(ray_session.remote(lambda: os.nice(0)).remote()) == RayConfig().worker_niceness == 0


def test_local_ray_starts_its_workers_with_torch_imported_before_ray(ray_session, tmp_path):
    """Default ``ray.worker_preload: [torch]``: a task's worker and a Tune trial's (Tune gives its actors a
    runtime_env of their own, which must keep the job's ``py_executable``) imported torch before Ray."""
    from ray import tune

    def import_order() -> tuple[str | None, bool]:  # nested: Ray ships it by value (tests/ is not importable there)
        """In a Ray worker: what metaopt.worker_start preloaded, and whether torch was imported before Ray."""
        modules = list(sys.modules)  # in import order
        torch_first = "torch" in modules and modules.index("torch") < modules.index("ray._raylet")
        return os.environ.get(PRELOADED_ENV), torch_first

    assert "runtime_env" not in local_ray_options(RayConfig(worker_preload=[]))
    command = local_ray_options(RayConfig())["runtime_env"]["py_executable"]
    assert command.endswith("-m metaopt.worker_start torch") and sys.executable in command
    assert ray_session.get(ray_session.remote(import_order).remote()) == ("torch", True)

    def trainable(config):
        preloaded, torch_first = import_order()
        tune.report({"preloaded": preloaded, "torch_first": torch_first})

    result = tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()[0]
    assert result.error is None and (result.metrics["preloaded"], result.metrics["torch_first"]) == ("torch", True)


def test_worker_start_preloads_then_runs_the_worker_script_as_python_would(tmp_path):
    """Modules first (one that cannot be imported is reported and skipped), then the script with its own
    arguments and its directory first on sys.path."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import json, os, sys\n"
        f"print(json.dumps({{'argv': sys.argv, 'path0': sys.path[0], 'preloaded': os.environ['{PRELOADED_ENV}'],"
        " 'colorsys_loaded': 'colorsys' in sys.modules, 'name': __name__}))\n"
    )
    run = subprocess.run([sys.executable, "-m", "metaopt.worker_start", "colorsys,no_such_module_xyz", str(script),
                          "--node-ip-address=127.0.0.1", "two words"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen == {"argv": [str(script), "--node-ip-address=127.0.0.1", "two words"], "path0": str(tmp_path),
                    "preloaded": "colorsys", "colorsys_loaded": True, "name": "__main__"}
    assert "worker preload: cannot import no_such_module_xyz: ModuleNotFoundError" in run.stderr
