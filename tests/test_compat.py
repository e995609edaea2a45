"""Every door in :mod:`metaopt.compat` on the versions it was written for and on its fallback (the version
monkeypatched, or the private name removed): the fallback warns once and the result is still right. No cluster:
stand-ins for the Tune trainable, PBT scheduler, RLlib learner and MLflow store, and real Ray/MLflow modules
only where they are imported anyway."""

from __future__ import annotations

import os
import random
import sys
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version

from metaopt import compat, worker_start
from metaopt.compat import mlflow as compat_mlflow
from metaopt.compat import ray as compat_ray
from metaopt.compat import rllib as compat_rllib
from metaopt.compat import trl as compat_trl
from metaopt.compat import tune as compat_tune
from metaopt.errors import ConfigError


@pytest.fixture(autouse=True)
def fresh_checks():
    compat.reset_for_tests()
    yield
    compat.reset_for_tests()


@pytest.fixture
def other_versions(monkeypatch):
    """Every library at a version no door was written for."""
    monkeypatch.setattr(compat, "installed_version", lambda distribution: Version("99.0"))


def warnings_in(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("[metaopt] warning:")]


def test_version_check_and_the_warning_said_once(capsys):
    assert compat.version_matches("ray", compat_ray.WRITTEN_FOR)  # the installed Ray is the one we pin
    assert not compat.version_matches("ray", "<1")
    assert not compat.version_matches("no-such-distribution-xyz", ">=0")
    holder = SimpleNamespace(present=1)
    assert compat.private_api_usable("ray", compat_ray.WRITTEN_FOR, (holder, "present"))
    assert not compat.private_api_usable("ray", compat_ray.WRITTEN_FOR, (holder, "present"), (holder, "gone"))
    compat.warn_fallback("k", "first")
    compat.warn_fallback("k", "again")
    assert warnings_in(capsys) == ["[metaopt] warning: first"]


# ------------------------------------------------------------------------------------------------- Tune


class StandInTrainable:
    """What Tune 2.60's class trainable holds: its iteration in ``_iteration``."""

    def __init__(self):
        self._iteration = 3


def test_set_iteration_writes_tunes_counter_and_falls_back_to_leaving_it(monkeypatch, capsys):
    trainable = StandInTrainable()
    compat_tune.set_iteration(trainable, 7)
    assert trainable._iteration == 7 and warnings_in(capsys) == []

    monkeypatch.setattr(compat, "installed_version", lambda distribution: Version("99.0"))
    compat_tune.set_iteration(trainable, 9)
    compat_tune.set_iteration(trainable, 9)
    assert trainable._iteration == 7  # Tune's own count stays (see compat.tune: a few extra iterations at most)
    assert len(warnings_in(capsys)) == 1


def test_real_tune_trainable_counts_on_from_set_iteration():
    from ray import tune

    class Counting(tune.Trainable):
        def step(self):
            return {"x": 1}

    trainable = Counting(config={})
    try:
        compat_tune.set_iteration(trainable, 5)
        assert trainable.iteration == 5 and trainable.train()["training_iteration"] == 6
    finally:
        trainable.stop()


class StandInPBTState:
    def __init__(self, train_time: int, perturbation_time: int, checkpoint=None):
        self.last_train_time, self.last_perturbation_time, self.last_checkpoint = (
            train_time,
            perturbation_time,
            checkpoint,
        )


def test_pbt_bookkeeping_is_read_and_its_fallback_keeps_every_checkpoint(monkeypatch, capsys, tmp_path):
    from ray.tune.schedulers import PopulationBasedTraining

    from metaopt.tuning import checkpoint_config, restorable_paths

    pending = SimpleNamespace(resolve=lambda block: None)  # a save PBT asked for, not done yet
    done = SimpleNamespace(resolve=lambda block: SimpleNamespace(checkpoint=SimpleNamespace(path="/done")))
    scheduler = PopulationBasedTraining(metric="m", mode="max", hyperparam_mutations={"lr": [0.1]})
    scheduler._trial_state = {
        "a": StandInPBTState(4, 4, SimpleNamespace(path="/a")),
        "b": StandInPBTState(2, 0, pending),
        "c": StandInPBTState(1, 0, done),
        "d": StandInPBTState(0, 0),
    }
    assert compat_tune.pbt_state_readable(scheduler)
    assert [c.path for c in compat_tune.pbt_recorded_checkpoints(scheduler)] == ["/a", "/done"]
    assert (
        compat_tune.pbt_last_train_time(scheduler, "a"),
        compat_tune.pbt_last_perturbation_time(scheduler, "b"),
    ) == (4, 0)
    trials = [SimpleNamespace(checkpoint=SimpleNamespace(path="/latest"))]
    assert restorable_paths(trials, scheduler) == {"/latest", "/a", "/done"}
    config, callbacks = checkpoint_config(1, 2, scheduler, [])
    assert config.num_to_keep is None and len(callbacks) == 1  # KeepLastCheckpoints does the deleting

    monkeypatch.setattr(compat, "installed_version", lambda distribution: Version("99.0"))
    assert not compat_tune.pbt_state_readable(scheduler)
    config, callbacks = checkpoint_config(1, 2, scheduler, [])
    assert config.num_to_keep is None and callbacks == []  # nothing deleted: every checkpoint stays restorable
    assert restorable_paths(trials, scheduler) == {"/latest"}
    assert len(warnings_in(capsys)) == 1


class StandInTrial:
    def __init__(self, tag: str, status: str = "RUNNING"):
        self.experiment_tag, self.status = tag, status


def test_exploit_hook_seeds_pbt_decisions_and_falls_back_to_plain_pbt(monkeypatch, capsys):
    from ray.tune.schedulers import PopulationBasedTraining

    from metaopt.tuning import SeededPBT

    monkeypatch.setattr(PopulationBasedTraining, "_checkpoint_or_exploit", lambda self, trial, *args: random.random())
    trial = StandInTrial("3_lr=0.1")

    def decide(global_seed: int) -> float:
        """One exploit decision of a fresh scheduler (seed 11), the driver's global generator at ``global_seed``."""
        scheduler = SeededPBT(metric="m", mode="max", hyperparam_mutations={"lr": [0.1]}, seed=11)
        scheduler._trial_state = {trial: StandInPBTState(8, 8)}
        random.seed(global_seed)
        return scheduler._checkpoint_or_exploit(trial, None, [], [])

    random.seed(1)
    global_draw = random.random()
    assert decide(1) == decide(2) != global_draw  # the sweep's seed, the trial and its iteration decide

    monkeypatch.setattr(compat, "installed_version", lambda distribution: Version("99.0"))
    assert decide(1) == global_draw  # the fallback: plain PBT, drawing from the global generator
    assert len(warnings_in(capsys)) == 1


def test_even_finish_without_pbt_bookkeeping_is_tunes_own_scheduler(monkeypatch, capsys):
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    from metaopt.even_finish import EvenFinishPBT

    def scheduler() -> EvenFinishPBT:
        return EvenFinishPBT(
            stop_iteration=8,
            switch_seconds=0.0,
            time_attr="training_iteration",
            metric="m",
            mode="max",
            perturbation_interval=4,
            hyperparam_mutations={"lr": [0.1]},
            seed=0,
        )

    running = StandInTrial("0", Trial.RUNNING)
    waiting = StandInTrial("1", Trial.PAUSED)
    controller = SimpleNamespace(get_trials=lambda: [running, waiting])
    monkeypatch.setattr(PopulationBasedTraining, "on_trial_result", lambda self, c, t, r: TrialScheduler.CONTINUE)
    monkeypatch.setattr(PopulationBasedTraining, "choose_trial_to_run", lambda self, c: "tune's choice")
    result = {"training_iteration": 7, "time_this_iter_s": 1.0}

    levelled = scheduler()
    levelled._trial_state = {running: StandInPBTState(7, 4), waiting: StandInPBTState(5, 4)}
    assert levelled.on_trial_result(controller, running, result) == TrialScheduler.PAUSE  # yields to the one behind
    assert levelled.choose_trial_to_run(controller) is waiting

    monkeypatch.setattr(compat, "installed_version", lambda distribution: Version("99.0"))
    plain = scheduler()
    assert plain.on_trial_result(controller, running, result) == TrialScheduler.CONTINUE
    assert plain.choose_trial_to_run(controller) == "tune's choice"
    assert len(warnings_in(capsys)) >= 1


# -------------------------------------------------------------------------------------------------- Ray


def test_ray_init_system_config_and_its_fallback(other_versions, capsys):
    assert compat_ray.system_config(7) == {}
    assert len(warnings_in(capsys)) == 1


def test_ray_init_system_config_on_the_pinned_version():
    assert compat_ray.system_config(7) == {
        "_system_config": {"worker_niceness": 7, "prestart_worker_first_driver": False}
    }


def test_single_node_switch_sets_and_restores_and_falls_back(monkeypatch, capsys):
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    monkeypatch.delenv(name, raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    with compat_ray.single_node_switch() as switched:
        assert switched and os.environ[name] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    assert name not in os.environ and before == ray_constants.ENABLE_RAY_CLUSTER

    monkeypatch.setattr(compat, "installed_version", lambda distribution: Version("99.0"))
    with compat_ray.single_node_switch() as switched:
        assert not switched and name not in os.environ
    assert "no single-node switch" in warnings_in(capsys)[0]


def test_omp_thread_count_is_followed_and_the_fallback_wraps_nothing(monkeypatch, capsys):
    import ray._private.utils as ray_utils

    def ray_sets_two_threads() -> bool:
        os.environ["OMP_NUM_THREADS"] = "2"
        return True

    monkeypatch.setattr(ray_utils, "set_omp_num_threads_if_unset", ray_sets_two_threads)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []
    assert compat_ray.follow_omp_thread_count(seen.append)
    assert ray_utils.set_omp_num_threads_if_unset() and seen == [2]

    monkeypatch.setattr(ray_utils, "set_omp_num_threads_if_unset", ray_sets_two_threads)
    monkeypatch.setattr(compat, "installed_version", lambda distribution: Version("99.0"))
    assert not compat_ray.follow_omp_thread_count(seen.append)
    assert ray_utils.set_omp_num_threads_if_unset is ray_sets_two_threads and len(warnings_in(capsys)) == 1


def test_worker_starts_when_the_ray_door_cannot_be_imported(monkeypatch, tmp_path, capsys):
    """worker_start never stops a worker from starting: an import of metaopt.compat.ray that fails (here: a
    ModuleNotFoundError for it, not for ``metaopt``) is one line on stderr, then torch gets the fallback thread
    count and the worker script runs."""
    monkeypatch.setitem(sys.modules, "metaopt.compat.ray", None)  # the import fails as a missing module does
    with pytest.raises(ModuleNotFoundError):
        worker_start.compat_ray_module()
    assert worker_start.follow_rays_thread_count() is False
    assert capsys.readouterr().err.splitlines() == [
        "[metaopt] worker start: cannot follow Ray's thread count: ModuleNotFoundError: "
        "import of metaopt.compat.ray halted; None in sys.modules"
    ]

    script, ran = tmp_path / "worker.py", tmp_path / "ran"
    script.write_text(f"import sys\nopen({str(ran)!r}, 'w').write(' '.join(sys.argv[1:]))\n")
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(worker_start.PRELOADED_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    worker_start.main(["", str(script), "--node-ip-address=x"])
    assert ran.read_text() == "--node-ip-address=x" and threads == [1]  # started, with Ray's 1-CPU thread count
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_auth_token_lookup_by_ray_and_its_python_fallback(monkeypatch, tmp_path, capsys):
    assert isinstance(compat_ray.auth_token_exists(), bool)  # Ray's own loader, on the pinned version
    (tmp_path / "token").write_text("s3cret\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compat_ray.token_in_usual_places({"RAY_AUTH_TOKEN": "x"})
    assert compat_ray.token_in_usual_places({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")})
    assert not compat_ray.token_in_usual_places({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")})
    assert not compat_ray.token_in_usual_places({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    assert compat_ray.token_in_usual_places({})  # ~/.ray/auth_token
    (tmp_path / ".ray" / "auth_token").unlink()
    assert not compat_ray.token_in_usual_places({"RAY_AUTH_TOKEN": " "})

    monkeypatch.setattr(compat, "installed_version", lambda distribution: Version("99.0"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    assert compat_ray.auth_token_exists()  # the Python lookup
    compat_ray.reload_auth_mode()  # nothing to re-read without Ray's config: no error
    assert len(warnings_in(capsys)) == 1


# ----------------------------------------------------------------------------------------------- MLflow


def test_mlflow_empty_store_template_or_none_on_another_version(monkeypatch, tmp_path, capsys):
    """(The template MLflow's private set-up builds is checked against a store MLflow makes itself in
    tests/test_session.py.)"""
    from metaopt import tracking

    assert compat_mlflow.can_build_empty_store()
    monkeypatch.setenv("METAOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compat, "installed_version", lambda distribution: Version("99.0"))
    assert not compat_mlflow.can_build_empty_store()
    assert tracking.empty_store_template() is None  # no template: MLflow makes each new store itself
    assert not tracking.seed_sqlite_store(f"sqlite:///{tmp_path / 'new.db'}") and not (tmp_path / "new.db").exists()
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    assert len(warnings_in(capsys)) == 1


# ------------------------------------------------------------------------------------------------ RLlib


class StandInLearner:
    """A torch Learner as RLlib 2.60 holds it: its optimizers, their lr schedulers, the setters; and the
    public getters the fallback uses."""

    def __init__(self):
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
        self._named_optimizers = {"default_policy_default_optimizer": self.optimizer}
        self._optimizer_lr_schedules = {}
        self._weights_seq_no = 12
        self.module = {"default_policy": None}

    @staticmethod
    def _set_optimizer_lr(optimizer, lr):
        for group in optimizer.param_groups:
            group["lr"] = lr

    @staticmethod
    def _get_optimizer_lr(optimizer):
        return optimizer.param_groups[0]["lr"]

    def get_optimizers_for_module(self, module_id):
        return [("default_optimizer", self.optimizer)]


def test_rllib_learner_lr_refuses_where_rllib_would_put_its_own_rate_back(monkeypatch):
    """A rate in torch's param_groups alone would be reverted by RLlib after one update, so PBT would tune a
    rate that is not used: another version, or the pinned one without the private names, is refused in one
    line. (RLlib's own path, with its Scheduler, runs on a real Learner in tests/test_rllib_task.py.)"""
    learner = StandInLearner()
    del learner._optimizer_lr_schedules
    with pytest.raises(ConfigError) as missing:
        compat_rllib.set_learner_lr(learner, 0.02)
    assert str(missing.value) == (
        f"ray[rllib]: found RLlib {compat.installed_version('ray')} without Learner._optimizer_lr_schedules; "
        "setting its learning rate from an outer loop needs ray[rllib]==2.60.* (elsewhere RLlib puts config.lr "
        "back after each update): pip install 'ray[rllib]==2.60.*'"
    )

    monkeypatch.setattr(compat, "installed_version", lambda distribution: Version("99.0"))
    learner = StandInLearner()
    with pytest.raises(ConfigError, match=r"^ray\[rllib\]: found RLlib 99\.0; .* needs ray\[rllib\]==2\.60\.\* "):
        compat_rllib.set_learner_lr(learner, 0.02)
    assert learner.optimizer.param_groups[0]["lr"] == 0.5  # nothing written
    assert "\n" not in str(ConfigError("ray[rllib]", compat_rllib.unsupported_rllib_problem(learner)))
    # Reading the rate back needs no private name: torch's param_groups hold what the next update uses.
    assert compat_rllib.learner_lrs(learner) == {"default_policy_default_optimizer": pytest.approx(0.5)}


class StandInAlgorithm:
    """An Algorithm with one local Learner and one local EnvRunner, as ``num_learners=0``, ``num_env_runners=0``."""

    def __init__(self):
        self.learner, self.runner = StandInLearner(), SimpleNamespace(_weights_seq_no=5)
        self.learner_group = SimpleNamespace(foreach_learner=self.foreach_learner)
        self.env_runner_group = SimpleNamespace(foreach_env_runner=lambda fn: [fn(self.runner)])

    def foreach_learner(self, fn):
        value = fn(self.learner)
        return [SimpleNamespace(ok=True, get=lambda: value)]


def test_rllib_restore_forgets_weights_versions_or_forces_them_in_the_state(monkeypatch, capsys):
    state = {
        "learner_group": {"learner": {"weights_seq_no": 9, "rl_module": {"w": [1.0]}}},
        "env_runners": {"weights_seq_no": 9},
    }
    algo = StandInAlgorithm()
    assert compat_rllib.restorable_state(algo, state) is state
    assert algo.learner._weights_seq_no == 0 and algo.runner._weights_seq_no == 0

    monkeypatch.setattr(compat, "installed_version", lambda distribution: Version("99.0"))
    algo = StandInAlgorithm()
    forced = compat_rllib.restorable_state(algo, state)
    assert forced == {
        "learner_group": {"learner": {"weights_seq_no": 0, "rl_module": {"w": [1.0]}}},
        "env_runners": {"weights_seq_no": 0},
    }
    assert state["env_runners"]["weights_seq_no"] == 9 and algo.learner._weights_seq_no == 12  # untouched
    assert len(warnings_in(capsys)) == 1


# -------------------------------------------------------------------------------------------------- TRL


def test_trl_oracle_fails_clearly_when_trls_internals_change(monkeypatch):
    from trl.trainer.grpo_trainer import GRPOTrainer

    logp = torch.zeros(2, 3, dtype=torch.float64)
    inputs = (logp, logp, logp, torch.ones(2, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    loss, metrics = compat_trl.grpo_oracle(*inputs, beta=0.04, epsilon=0.2, aggregation="token_mean")
    # ratio 1, advantage 1, reference = policy: loss -A = -1, no KL, nothing clipped
    assert loss == pytest.approx(-1.0) and metrics == {"kl": pytest.approx(0.0), "clip_fraction": 0.0}

    monkeypatch.delattr(GRPOTrainer, "_compute_loss")
    with pytest.raises(
        compat_trl.TRLInternalsChanged, match=r"GRPOTrainer internals changed .* update metaopt/compat/trl\.py"
    ):
        compat_trl.grpo_oracle(*inputs, beta=0.04, epsilon=0.2, aggregation="token_mean")
    assert issubclass(compat_trl.TRLInternalsChanged, AssertionError)  # a test using it fails, never skips


def test_numpy_arrays_load_weights_only_and_the_fallback_refuses_them_clearly(tmp_path, monkeypatch):
    """The private pickle helpers let a weights-only load rebuild numpy arrays; without them (another numpy) the
    load is refused as an unreadable checkpoint, never a wrong state."""
    import numpy as np

    from metaopt import tuning
    from metaopt.compat import numpy as compat_numpy

    state = {"weights": np.arange(6, dtype=np.float32).reshape(2, 3), "scale": np.float64(0.5)}
    tuning.save_state(state, str(tmp_path))
    loaded = tuning.read_state(tmp_path / tuning.STATE_FILE)
    assert np.array_equal(loaded["weights"], state["weights"]) and loaded["scale"] == 0.5

    monkeypatch.setattr(compat_numpy, "WRITTEN_FOR", "==0.1")
    with pytest.raises(tuning.UnreadableCheckpoint, match="cannot be read"):
        tuning.read_state(tmp_path / tuning.STATE_FILE)
