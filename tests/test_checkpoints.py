"""Checkpoint files: atomic writes, ``weights_only`` loads, a broken one reported for its trial only, and the
last ``ray.checkpoints_to_keep`` kept per trial without breaking PBT's exploits or the lineage reader."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from metaopt.cache import replace_atomically, write_atomically
from metaopt.pbt import lineage, sweep
from metaopt.pbt import tune as pbt_tune
from metaopt.tuning import KeepLastCheckpoints, UnreadableCheckpoint, load_state, read_state, save_state


def test_interrupted_atomic_write_leaves_the_old_checkpoint_intact(tmp_path):
    path = tmp_path / "trial_state.pt"
    save_state({"step": 1, "w": torch.ones(3)}, str(tmp_path))

    def half_then_crash(tmp: Path) -> None:
        tmp.write_bytes(b"PK\x03\x04 half a zip")  # what a kill mid-write leaves in the temporary
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        replace_atomically(path, half_then_crash)
    old = load_state(str(tmp_path))
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["trial_state.pt"]  # no temporary left behind


def test_write_errors_reach_the_checkpoint_but_not_the_cache(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file, not a folder")
    with pytest.raises(OSError, match=re.escape(str(blocked))):  # a checkpoint that cannot be written fails loudly
        replace_atomically(blocked / "state.pt", lambda tmp: tmp.write_text("x"))
    assert write_atomically(blocked / "cached.npz", lambda tmp: tmp.write_text("x")) is False


class RunsCode:
    """A pickled object whose unpickling calls ``Path.touch``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weights_only_load_refuses_a_checkpoint_that_runs_code(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"task": RunsCode(marker)}, tmp_path / "trainable_state.pt")
    with pytest.raises(UnreadableCheckpoint, match=r"trainable_state\.pt cannot be read"):
        load_state(str(tmp_path), "trainable_state.pt")
    assert not marker.exists()
    torch.load(tmp_path / "trainable_state.pt", weights_only=False)  # the old load: the payload is real
    assert marker.exists()


def test_states_of_every_trainable_survive_a_weights_only_load(tmp_path):
    rng = np.random.default_rng(7)
    rng.random(5)
    generator = torch.Generator().manual_seed(3)
    state = {
        "rng": rng.bit_generator.state,  # 128-bit ints (federated, posttrain)
        "batch_order": generator.get_state(),  # torch tasks
        "lr_history": [(0, 0.1), (40, 0.05)],
        "algorithm": {
            "weights": np.arange(6, dtype=np.float32).reshape(2, 3),
            "count": np.int64(4),
            "mask": np.array([True, False]),
            "mean": np.float64(0.5),
        },  # RLlib's numpy state
    }
    save_state(state, str(tmp_path))
    loaded = load_state(str(tmp_path))
    restored = np.random.default_rng(0)
    restored.bit_generator.state = loaded["rng"]
    assert restored.random() == rng.random()
    assert torch.equal(loaded["batch_order"], generator.get_state())
    assert loaded["lr_history"] == [(0, 0.1), (40, 0.05)]
    assert np.array_equal(loaded["algorithm"]["weights"], state["algorithm"]["weights"])
    assert loaded["algorithm"]["count"] == 4 and loaded["algorithm"]["mask"].dtype == bool


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_a_damaged_checkpoint_is_named(tmp_path, damage):
    save_state({"w": torch.zeros(1000)}, str(tmp_path))
    path = tmp_path / "trial_state.pt"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(2000))
    else:
        path.unlink()
    with pytest.raises(UnreadableCheckpoint, match=f"checkpoint file {path}"):
        read_state(path)


class FakeCheckpoint:
    """A checkpoint folder on the local file system, as Tune's ``Checkpoint`` exposes it (path, filesystem)."""

    def __init__(self, path: Path):
        import pyarrow.fs

        path.mkdir()
        self.path, self.filesystem = str(path), pyarrow.fs.LocalFileSystem()


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id, self.checkpoint = trial_id, None


class FakePBTState:
    def __init__(self):
        self.last_checkpoint = None


def test_retention_keeps_the_last_k_and_what_pbt_may_still_restore(tmp_path):
    donor, target = FakeTrial("donor"), FakeTrial("target")
    scheduler = type("PBT", (), {})()
    scheduler._trial_state = {donor: FakePBTState(), target: FakePBTState()}
    keep = KeepLastCheckpoints(2, scheduler)

    def save(trial, index):
        checkpoint = FakeCheckpoint(tmp_path / f"{trial.trial_id}_{index}")
        keep.on_checkpoint(index, [donor, target], trial, checkpoint)
        trial.checkpoint = checkpoint  # Tune registers it as the latest after the callbacks
        return checkpoint

    boundary = save(donor, 1)
    scheduler._trial_state[donor].last_checkpoint = boundary  # PBT: the donor is a top trial at its boundary
    target.checkpoint = boundary  # PBT: the target exploits it, restored when it gets a worker
    for index in range(2, 6):
        save(donor, index)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["donor_1", "donor_4", "donor_5"]
    save(target, 1)  # the target restored and saved its own: the donor's boundary is still PBT's record
    save(donor, 6)
    assert Path(boundary.path).exists()
    scheduler._trial_state[donor].last_checkpoint = None  # next boundary: no longer a top trial
    save(donor, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["donor_6", "donor_7", "target_1"]


def checkpoint_folders(experiment_path: str) -> dict[str, list[str]]:
    trials = [p for p in Path(experiment_path).iterdir() if p.is_dir() and list(p.glob("checkpoint_*"))]
    return {p.name: sorted(c.name for c in p.glob("checkpoint_*")) for p in trials}


def test_pbt_trials_keep_k_checkpoints_and_still_exploit_and_agree_on_lineage(ray_session, tiny):
    # 3 trials on 2 CPUs: one always waits, so an exploited trial may restore its donor's boundary checkpoint
    # after the donor saved more; a checkpoint every iteration, 1 kept.
    exp = tiny("pbt.population=3", "pbt.iterations=8", "pbt.checkpoint_interval=1", "ray.checkpoints_to_keep=1")
    summary = sweep.run(exp, verbose=0)

    assert len(summary.trials) == 3
    events = lineage.read_pbt_global(Path(summary.experiment_path) / "pbt_global.txt")
    assert events, "no exploit happened: the test proves nothing about restoring kept checkpoints"
    for trial in summary.trials:
        assert trial.steps == exp.section.iterations * exp.section.steps_per_iteration
        assert trial.lineage_agrees, (trial.schedule, trial.carried_schedule)
    folders = checkpoint_folders(summary.experiment_path)
    assert folders and all(len(kept) <= 2 for kept in folders.values()), folders  # k + PBT's boundary record


def test_fixed_lr_trials_keep_k_checkpoints(ray_session, tiny):
    exp = tiny("pbt.scheduler=random", "pbt.iterations=6", "pbt.checkpoint_interval=1", "ray.checkpoints_to_keep=2")
    summary = sweep.run(exp, verbose=0)
    folders = checkpoint_folders(summary.experiment_path)
    assert len(folders) == 2 and all(len(kept) == 2 for kept in folders.values()), folders


class BreakCheckpoint(Callback):
    """Truncates the last checkpoint of the first trial once the experiment ends (before the summary reads it)."""

    def __init__(self):
        self.broken: tuple[str, Path] | None = None

    def on_experiment_end(self, trials, **info):
        trial = trials[0]
        path = Path(trial.checkpoint.path) / pbt_tune.STATE_FILE
        path.write_bytes(path.read_bytes()[:100])
        self.broken = (trial.trial_id, path)


def test_a_corrupt_checkpoint_is_reported_for_its_trial_and_the_summary_keeps_the_others(ray_session, tiny, capsys):
    exp = tiny("pbt.scheduler=random", "pbt.iterations=2")
    breaker = BreakCheckpoint()
    summary = sweep.run(exp, callbacks=[breaker], verbose=0)

    bad_id, path = breaker.broken
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if "warning: trial" in line)
    assert bad_id in warning and str(path) in warning and "cannot be read" in warning
    trial_ids = {t.trial_id for t in summary.trials}
    assert len(trial_ids) == 2 and bad_id in trial_ids
    for trial in summary.trials:
        assert (trial.carried_schedule is None) == (trial.trial_id == bad_id)
        assert trial.steps == exp.section.iterations * exp.section.steps_per_iteration
        assert any(line.startswith(trial.trial_id) for line in out.splitlines())  # a row in the printed table
    client = MlflowClient(exp.tracking.uri)
    assert client.get_run(summary.parent_run_id).info.status == "FINISHED"
    with Path(client.download_artifacts(summary.parent_run_id, "summary.csv")).open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["trial_id"] for row in rows} == trial_ids


def test_a_corrupt_search_checkpoint_costs_only_its_own_summary(tmp_path, capsys):
    from types import SimpleNamespace

    from metaopt.symbolic.sweep import summarise
    from metaopt.symbolic.tune import STATE_FILE

    (tmp_path / STATE_FILE).write_text('{"iteration": 3, "history": [')  # cut off mid-write by an old writer
    result = SimpleNamespace(
        checkpoint=SimpleNamespace(path=str(tmp_path)),
        metrics={"trial_id": "abc_00001"},
        config={"seed": 4},
        error=None,
        path=str(tmp_path),
    )
    summary = summarise(result)
    assert summary.state is None and summary.trial_id == "abc_00001" and summary.seed == 4
    warning = capsys.readouterr().out
    assert "trial abc_00001" in warning and str(tmp_path / STATE_FILE) in warning and "cannot be read" in warning
