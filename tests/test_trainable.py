"""The one trainable base (metaopt.trainable): set-up, checkpoint folder, restored iteration -- without Ray.

A Tune class trainable runs in-process here (``train()`` calls ``step`` and counts iterations as in a trial);
the end-to-end restores through Tune are the capabilities' own tests (a trial process killed mid-sweep in
test_pbt, test_federated_tune, test_objectives_meta, test_symbolic_search)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from metaopt import trainable
from metaopt.tuning import UnreadableCheckpoint


class Counter(trainable.Trainable):
    """A torch state (a running sum) in the default checkpoint; the iteration restored from inside it."""

    uses_torch = True
    state_file = "counter.pt"

    def start(self, config):
        self.total = torch.tensor(float(config["start"]))

    def step(self):
        self.total += 1.0
        return {"total": float(self.total)}

    def state_dict(self):
        return {"total": self.total, "iteration": self.iteration}

    def load_state_dict(self, state):
        self.total = state["total"]
        return int(state["iteration"])


class JsonCounter(trainable.Trainable):
    """Its own file format; it leaves the iteration count to Tune (returns None)."""

    def start(self, config):
        self.total = config["start"]

    def step(self):
        self.total += 1
        return {"total": self.total}

    def write_checkpoint(self, directory: Path) -> None:
        (directory / "total.json").write_text(json.dumps(self.total))

    def read_checkpoint(self, directory: Path) -> None:
        self.total = json.loads((directory / "total.json").read_text())


@pytest.fixture
def process_settings():
    """The torch threads and Tune logger levels a trainable changes in this (test) process, put back after."""
    threads = torch.get_num_threads()
    levels = {name: logging.getLogger(name).level for name in trainable.TUNE_TRIAL_LOGGERS}
    yield
    torch.set_num_threads(threads)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_save_then_restore_keeps_the_state_and_the_iteration(tmp_path, process_settings):
    original = Counter(config={"start": 5})
    for _ in range(3):
        original.train()
    original.save_checkpoint(str(tmp_path))
    assert (tmp_path / "counter.pt").is_file()

    restored = Counter(config={"start": 0})
    restored.load_checkpoint(str(tmp_path))
    assert float(restored.total) == 8.0 and restored.iteration == 3
    result = restored.train()  # counts on from the checkpoint, as an uninterrupted trial would
    assert result["training_iteration"] == 4 and result["total"] == 9.0
    restored.load_checkpoint({"checkpoint_dir": str(tmp_path)})  # the dict form Tune may hand over
    assert restored.iteration == 3


def test_a_trainable_of_its_own_format_keeps_tunes_iteration(tmp_path, process_settings):
    original = JsonCounter(config={"start": 1})
    original.train()
    original.train()
    original.save_checkpoint(str(tmp_path))
    restored = JsonCounter(config={"start": 0})
    restored.train()
    restored.load_checkpoint(str(tmp_path))
    assert restored.total == 3 and restored.iteration == 1  # None: the count stays Tune's


def test_a_truncated_checkpoint_is_one_unreadable_checkpoint_error(tmp_path, process_settings):
    counter = Counter(config={"start": 0})
    counter.train()
    counter.save_checkpoint(str(tmp_path))
    path = tmp_path / "counter.pt"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(UnreadableCheckpoint, match=r"counter\.pt cannot be read"):
        Counter(config={"start": 0}).load_checkpoint(str(tmp_path))


def test_setup_quietens_tunes_trial_loggers_unless_verbose(process_settings):
    for name in trainable.TUNE_TRIAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    JsonCounter(config={"start": 0, "verbose_actors": True})
    assert all(logging.getLogger(n).level == logging.INFO for n in trainable.TUNE_TRIAL_LOGGERS)
    JsonCounter(config={"start": 0})
    assert all(logging.getLogger(n).level == logging.WARNING for n in trainable.TUNE_TRIAL_LOGGERS)


def test_a_torch_trainable_gets_its_thread_count_and_a_jax_one_leaves_torch_alone(monkeypatch, process_settings):
    torch.set_num_threads(3)
    JsonCounter(config={"start": 0})
    assert torch.get_num_threads() == 3
    Counter(config={"start": 0})
    assert torch.get_num_threads() == 1
    monkeypatch.setenv(trainable.TORCH_THREADS_VARIABLE, "2")
    Counter(config={"start": 0})
    assert torch.get_num_threads() == 2
    monkeypatch.setenv(trainable.TORCH_THREADS_VARIABLE, "0")
    assert trainable.torch_threads() == 1
