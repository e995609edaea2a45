"""PBT learning-rate sweeps end to end on real Ray Tune and real MLflow (sqlite default and a server)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from conftest import EXPERIMENTS, KillTrialProcess, assert_runs_finished, free_port
from metaopt import cli, tracking
from metaopt.pbt import lineage, replay, sweep


def budget(exp) -> int:
    """Every trial's budget in optimizer steps (what the sweep stops on)."""
    return exp.section.iterations * exp.section.steps_per_iteration


def mlflow_view(uri: str, summary: sweep.SweepSummary, experiment_name: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no MLflow experiment {experiment_name!r}"
    children = tracking.child_runs(client, experiment.experiment_id, summary.parent_run_id)
    return client, experiment, children


def assert_tracked_sweep(uri: str, summary: sweep.SweepSummary, exp, metric: str = "val_accuracy") -> None:
    client, _experiment, children = mlflow_view(uri, summary, exp.mlflow_experiment)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    # the full resolved config as params of the sweep run
    assert parent.data.params["pbt.population"] == str(exp.section.population)
    assert parent.data.params["kind"] == "pbt"
    artifacts = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"schedules.json", "schedules.png", "learning_curves.png", "summary.csv"} <= artifacts
    # one child run per trial, per-iteration metrics
    trial_runs = [r for r in children if r.data.tags.get("metaopt.role") == "trial"]
    assert len(trial_runs) == exp.section.population
    reported = {t.trial_id: t.reported for t in summary.trials}
    for run in trial_runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["exp.optimizer.name"] == exp.section.optimizer.name
        # every result Tune saw is a metric point of the trial's run
        history = client.get_metric_history(run.info.run_id, "step")
        assert sorted(int(m.value) for m in history) == sorted(s for s, _ in reported[run.data.tags["trial_id"]])
        assert client.get_metric_history(run.info.run_id, metric)


def test_pbt_sweep_tracks_to_sqlite_and_lineage_agrees(ray_session, tiny, capsys):
    exp = tiny()
    summary = sweep.run(exp, verbose=0)

    assert len(summary.trials) == 2
    for trial in summary.trials:
        assert trial.steps == budget(exp)
        assert not trial.diverged
        # the schedule rebuilt from Tune's PBT log equals the history carried through checkpoints
        assert trial.lineage_agrees, (trial.schedule, trial.carried_schedule)
    events = lineage.read_pbt_global(Path(summary.experiment_path) / "pbt_global.txt")
    assert events, "synchronous PBT with quantile 0.5 must exploit at every boundary"
    # an exploited trial's schedule starts with its ancestor's learning rate and then changes
    exploited = [t for t in summary.trials if len(t.schedule) > 1]
    assert exploited
    assert_tracked_sweep(exp.tracking.uri, summary, exp)

    # replay the best trial's discovered schedule from the MLflow run id: on CPU with the shared trial seed
    # the reconstruction must reproduce the PBT result (the tolerance only allows for float noise)
    payload = replay.load_payload(summary.parent_run_id, exp.tracking.uri)
    result = replay.replay(payload, progress=False)
    assert result.steps == budget(exp)
    assert abs(result.difference) <= 0.01, result
    # and for an exploited (non-trivial) lineage, through the CLI, which logs the replay under the sweep
    trial = exploited[0].trial_id
    assert cli.main(["replay", summary.parent_run_id, "--trial", trial, "--tracking-uri", exp.tracking.uri]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"replay of trial {trial}: val_accuracy")
    difference = float(line.split("difference ")[1].split(")")[0])
    assert abs(difference) <= 0.01, line
    _, _, children = mlflow_view(exp.tracking.uri, summary, exp.mlflow_experiment)
    replays = [r for r in children if r.data.tags.get("metaopt.role") == "replay"]
    assert len(replays) == 1 and replays[0].data.tags["replay_of_trial"] == trial


def test_unreachable_tracking_server_is_one_error_line_before_ray(ray_session, capsys):
    """No MLflow server at the tracking URI: exit 2 and one line naming tracking.uri at once, not MLflow's
    minutes of retries and a traceback."""
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    rc = cli.main(["run", str(EXPERIMENTS / "quickstart.yaml"), "--set", f"tracking.uri={uri}"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and time.monotonic() - started < 10
    assert err.splitlines() == [err.strip()] and err.startswith(
        f"metaopt: error: tracking.uri: no MLflow server answers at {uri}"
    )


def test_unwritable_sqlite_store_is_one_error_line(ray_session, tmp_path, capsys):
    """MLflow opens its store in a background thread while the sweep starts: a store that cannot be created is
    still one line naming tracking.uri and exit 2, up front."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for uri, message in [
        (f"sqlite:///{blocker}/mlflow.db", f"cannot create the MLflow store {blocker}/mlflow.db"),
        (f"sqlite:///{tmp_path}", f"sqlite:///{tmp_path} names a folder, not a database file"),
    ]:
        rc = cli.main(["run", str(EXPERIMENTS / "quickstart_tiny.yaml"), "--set", f"tracking.uri={uri}"])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "", (out, err)
        assert err.splitlines() == [err.strip()] and err.startswith(f"metaopt: error: tracking.uri: {message}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing left behind
    # a file MLflow cannot read as its store is only found by the background opener, once Tune has started
    rc = cli.main(
        [
            "run",
            str(EXPERIMENTS / "quickstart_tiny.yaml"),
            "--set",
            f"tracking.uri=sqlite:///{blocker}",
            "--set",
            f"ray.storage_path={tmp_path / 'ray_results'}",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            f"metaopt: error: tracking.uri: MLflow cannot use sqlite:///{blocker}: "
            "(sqlite3.DatabaseError) file is not a database"
        )
    ), err
    assert "Traceback" not in err


def test_pbt_sweep_against_mlflow_server(ray_session, tiny, mlflow_server):
    exp = tiny(uri=mlflow_server, name="tiny-on-server")
    summary = sweep.run(exp, verbose=0)
    assert_tracked_sweep(mlflow_server, summary, exp)
    payload = json.loads(
        Path(MlflowClient(mlflow_server).download_artifacts(summary.parent_run_id, "schedules.json")).read_text()
    )
    assert payload["best_trial"] == summary.best_trial
    assert set(payload["trials"]) == {t.trial_id for t in summary.trials}


def test_diverging_trial_is_reported_and_the_sweep_goes_on(ray_session, tiny, tmp_path, monkeypatch):
    # grid over two fixed learning rates: 0.05 trains, 1e4 blows SGD up within the first iteration.
    # Tracked to the default store, sqlite:///mlflow.db in the working directory.
    monkeypatch.chdir(tmp_path)
    exp = tiny("pbt.scheduler=grid", "pbt.lr_min=0.05", "pbt.lr_max=10000", uri="default")
    assert exp.tracking.uri == "sqlite:///mlflow.db"
    summary = sweep.run(exp, verbose=0)
    by_lr = sorted(summary.trials, key=lambda t: t.schedule[0][1])
    good, bad = by_lr
    assert bad.diverged and bad.iterations < exp.section.iterations  # stopped early, not crashed
    assert not good.diverged and good.steps == budget(exp)
    assert good.final_metric > 0.5
    assert summary.best_trial == good.trial_id
    _client, _experiment, children = mlflow_view(exp.tracking.uri, summary, exp.mlflow_experiment)
    tags = {r.data.tags["trial_id"]: r.data.tags.get("metaopt.diverged") for r in children}
    assert tags[bad.trial_id] == "true" and tags[good.trial_id] == "false"
    assert (tmp_path / "mlflow.db").exists()


def test_killed_trial_resumes_from_checkpoint_without_lost_iterations(ray_session, tiny):
    exp = tiny("pbt.scheduler=random", "pbt.iterations=6", "pbt.checkpoint_interval=2", "pbt.max_failures=2")
    killer = KillTrialProcess(at_iteration=3)
    summary = sweep.run(exp, callbacks=[killer], verbose=0)

    assert killer.killed, "the test did not kill anything"
    (victim_id,) = killer.killed
    victim = next(t for t in summary.trials if t.trial_id == victim_id)
    assert victim.iterations == 6 and not victim.diverged
    per_iteration = exp.section.steps_per_iteration
    steps = [s // per_iteration for s, _ in victim.reported]
    # it reported iterations 1..3, died, restarted from the iteration-2 checkpoint, redid 3 and went on to 6
    assert steps[:3] == [1, 2, 3] and steps[3:] == [3, 4, 5, 6], steps
    # the final checkpoint holds exactly iterations x steps_per_iteration optimizer steps: nothing lost
    assert victim.carried_schedule == [(0, victim.schedule[0][1])]
    state = _final_task_state(summary, victim_id)
    assert state["step"] == 6 * exp.section.steps_per_iteration
    assert math.isfinite(victim.final_metric) and victim.final_metric > 0.3
    assert_runs_finished(exp.tracking.uri, exp.mlflow_experiment, at_least=3)


def _final_task_state(summary, trial_id: str):
    import torch

    trial_dir = next(p for p in Path(summary.experiment_path).iterdir() if p.is_dir() and trial_id in p.name)
    last = sorted(trial_dir.glob("checkpoint_*"))[-1]
    return torch.load(last / "trainable_state.pt", weights_only=True)["task"]


def test_pb2_sweep_runs_and_rebuilds_schedules(ray_session, tiny):
    exp = tiny("pbt.scheduler=pb2")
    summary = sweep.run(exp, verbose=0)
    assert len(summary.trials) == 2
    assert all(t.steps == budget(exp) and t.lineage_agrees for t in summary.trials)
    for trial in summary.trials:
        assert all(exp.section.lr_min <= lr <= exp.section.lr_max for _, lr in trial.schedule)
    # PB2 searches log10(lr); the policy log's configs and the trials' MLflow params still hold the real lr
    for event in lineage.read_pbt_global(Path(summary.experiment_path) / "pbt_global.txt"):
        assert event.new_config["lr"] == lineage.config_lr(event.new_config)
    _client, _experiment, children = mlflow_view(exp.tracking.uri, summary, exp.mlflow_experiment)
    for run in (r for r in children if r.data.tags.get("metaopt.role") == "trial"):
        config = {"log_lr": float(run.data.params["log_lr"]), "exp": exp.section.model_dump()}
        assert float(run.data.params["lr"]) == lineage.config_lr(config)


def test_rllib_ppo_learning_rate_under_pbt(ray_session, tiny):
    exp = tiny(
        "pbt.task=cartpole_rllib",
        "pbt.optimizer={name: adam}",
        "pbt.steps_per_iteration=1",
        "pbt.task_options={train_batch_size: 500, minibatch_size: 100, num_epochs: 4}",
        "pbt.lr_min=0.0003",
        "pbt.lr_max=0.003",
        name="tiny-rllib",
    )
    summary = sweep.run(exp, verbose=0)
    assert summary.metric == "episode_return_mean"
    assert len(summary.trials) == 2
    for trial in summary.trials:
        assert trial.steps == budget(exp)
        assert trial.lineage_agrees, (trial.schedule, trial.carried_schedule)
        assert math.isfinite(trial.final_metric) and trial.final_metric > 10  # CartPole episodes last >= ~10 steps
    assert_tracked_sweep(exp.tracking.uri, summary, exp, metric="episode_return_mean")


class ResultOrder(Callback):
    """Every result in the order Tune's loop saw them: (trial id, training_iteration)."""

    def __init__(self):
        self.results: list[tuple[str, int]] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results.append((trial.trial_id, int(result["training_iteration"])))


def left_at_first_finish(results: list[tuple[str, int]], iterations: int) -> dict[str, int]:
    """Iterations each other trial still had to train when the first trial finished."""
    reached: dict[str, int] = {}
    for trial_id, it in results:
        reached[trial_id] = it
        if it == iterations:
            return {t: iterations - r for t, r in reached.items() if t != trial_id}
    raise AssertionError(f"no trial reached iteration {iterations}: {results}")


def run_async_population(tiny, monkeypatch, even_finish: bool):
    from metaopt import even_finish as levelling

    monkeypatch.setattr(levelling, "TRIAL_SWITCH_SECONDS", 0.0)  # level even these ~10 ms iterations
    exp = tiny(
        "pbt.population=4",
        "pbt.iterations=8",
        "pbt.perturbation_interval=4",
        "pbt.synch=false",
        "pbt.quantile_fraction=0.25",
        f"pbt.even_finish={str(even_finish).lower()}",
    )
    order = ResultOrder()
    return exp, sweep.run(exp, verbose=0, callbacks=[order]), order.results


def test_asynchronous_pbt_population_finishes_level(ray_session, tiny, monkeypatch):
    # 4 trials on 2 workers take turns of 4 iterations. Tune's PBT alone finishes 2 trials while the other 2
    # still wait with a whole turn (4 iterations) to go, to be trained 2 at a time with nothing else to run.
    # EvenFinish levels the last stretch: when the first trial finishes, every other one is nearly done.
    exp, summary, results = run_async_population(tiny, monkeypatch, even_finish=True)
    left = left_at_first_finish(results, exp.section.iterations)
    assert len(left) == 3 and max(left.values()) <= 2, (left, results)
    # the extra pauses lose nothing: full budgets, and the lineage from Tune's log matches the checkpoints'
    assert len(summary.trials) == 4
    for trial in summary.trials:
        assert trial.steps == budget(exp) and trial.iterations == exp.section.iterations
        assert trial.lineage_agrees, (trial.schedule, trial.carried_schedule)

    exp, summary, results = run_async_population(tiny, monkeypatch, even_finish=False)
    assert max(left_at_first_finish(results, exp.section.iterations).values()) == exp.section.perturbation_interval


def test_levelling_rules(tiny):
    from metaopt.even_finish import EvenFinishPBT, levelling_pays, yields_in_last_stretch
    from metaopt.pbt.tune import build_scheduler
    from metaopt.tuning import SeededPBT

    # asynchronous PBT levels its last stretch; synchronous PBT, or even_finish off, is Tune's own scheduler
    # (with its random choices seeded: test_faults.py)
    assert type(build_scheduler(tiny("pbt.synch=false").section, "val_accuracy", "max")) is EvenFinishPBT
    assert type(build_scheduler(tiny("pbt.synch=true").section, "val_accuracy", "max")) is SeededPBT
    off = tiny("pbt.synch=false", "pbt.even_finish=false").section
    assert type(build_scheduler(off, "val_accuracy", "max")) is SeededPBT
    with pytest.raises(ValueError, match="asynchronous"):
        EvenFinishPBT(stop_iteration=8, synch=True, hyperparam_mutations={"lr": [0.1]})

    # only in the last stretch (no perturbation boundary before the end), only to a trial with more left
    assert yields_in_last_stretch(3, 3, [4, 3])
    assert not yields_in_last_stretch(3, 3, [3, 2])
    assert not yields_in_last_stretch(4, 4 - 1, [8])  # a perturbation is still ahead: PBT's turns decide
    assert not yields_in_last_stretch(3, 1, [4])  # 22 iterations, interval 4: at 19 the boundary at 20 is ahead
    assert yields_in_last_stretch(1, 3, [2])  # ... and at 21 it is behind
    assert not yields_in_last_stretch(1, 3, [])
    # one waiting trial takes one worker: a second trial does not yield to it while the first is handing over
    assert yields_in_last_stretch(2, 2, [3], yielding=0)
    assert not yields_in_last_stretch(2, 2, [3], yielding=1)
    assert yields_in_last_stretch(2, 2, [3, 4], yielding=1)
    # an iteration must outweigh the switches: 4 trials on 2 workers, 75 ms a switch -> at least 0.3 s
    assert levelling_pays(2.5, population=4, running=2, switch_seconds=0.075)
    assert levelling_pays(0.3, population=4, running=2, switch_seconds=0.075)
    assert not levelling_pays(0.29, population=4, running=2, switch_seconds=0.075)
    assert not levelling_pays(0.5, population=64, running=2, switch_seconds=0.075)


def test_population_search_is_finished_only_when_every_trial_is():
    # Tune keeps a paused trial's actor only while the search may still produce trials; PopulationSearch says
    # so until the last trial has finished (TrialsLeft tells it from Tune's loop), then lets the run end.
    from metaopt.tuning import PopulationSearch, TrialsLeft

    class Trial:
        def __init__(self, finished: bool):
            self.finished = finished

        def is_finished(self) -> bool:
            return self.finished

    search = PopulationSearch(seed=0)
    watch = TrialsLeft(search)
    search.set_finished()  # every trial of the population has been generated
    trials = [Trial(True), Trial(False)]
    watch.on_step_begin(0, trials)
    assert not search.is_finished()
    assert search.next_trial() is None  # but it generates nothing more, and does not block
    trials[1].finished = True
    watch.on_step_end(1, trials)
    assert search.is_finished()
    # a restored experiment re-creates the callback: the state it sees is what counts
    search.trials_left = True
    TrialsLeft(search).on_step_begin(2, trials)
    assert search.is_finished()


def test_pbt_explore_never_leaves_the_lr_range(tiny):
    # Tune's own explore step (the oracle) with the scheduler's settings, from both bounds: x1.2 / x0.8 / resample.
    from ray.tune.schedulers.pbt import _explore

    from metaopt.pbt.tune import build_scheduler

    section = tiny("pbt.synch=true").section
    scheduler = build_scheduler(section, "val_accuracy", "max")
    for start in (section.lr_max, section.lr_max * 0.99, section.lr_min, section.lr_min * 1.01):
        for _ in range(40):
            new, _ops = _explore(
                {"lr": start},
                scheduler._hyperparam_mutations,
                scheduler._resample_probability,
                scheduler._perturbation_factors,
                scheduler._custom_explore_fn,
            )
            assert section.lr_min <= new["lr"] <= section.lr_max
