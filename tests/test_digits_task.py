"""The digits MLP task: learns, resumes bit-for-bit, applies the schedule per step, flags divergence."""

import math

import pytest
import torch

from metaopt.errors import ConfigError
from metaopt.optim import piecewise_constant
from metaopt.pbt.tune import has_diverged
from metaopt.tasks import build_task
from metaopt.tasks.digits import DigitsTask

SGD = {"name": "sgd", "momentum": 0.9}


def weights(task):
    return torch.cat([p.detach().flatten() for p in task.model.parameters()])


def test_learns_digits():
    task = DigitsTask({"hidden": [32]}, SGD, seed=0)
    before = task.evaluate("val")["val_accuracy"]
    metrics = task.train(300, lambda step: 0.05)
    assert task.step == 300
    assert before < 0.3 and metrics["val_accuracy"] > 0.9
    assert task.evaluate("test")["test_accuracy"] > 0.85


def test_restore_continues_bit_for_bit_in_a_task_built_with_another_seed():
    original = DigitsTask({}, {"name": "adamw"}, seed=0)
    original.train(45, lambda step: 1e-3)
    saved = original.state()
    resumed = DigitsTask({}, {"name": "adamw"}, seed=123)
    resumed.restore(saved)
    assert resumed.step == 45
    a, b = original.train(30, lambda step: 2e-3), resumed.train(30, lambda step: 2e-3)
    assert a == b
    assert torch.equal(weights(original), weights(resumed))


def test_chunked_training_equals_one_call():
    # replay trains in iteration-sized chunks; PBT trials too: chunking must not change the trajectory
    schedule = piecewise_constant([(0, 0.05), (37, 0.01)])
    whole, chunked = DigitsTask({}, SGD, seed=3), DigitsTask({}, SGD, seed=3)
    whole.train(100, schedule)
    for size in (10, 27, 63):
        chunked.train(size, schedule)
    assert torch.equal(weights(whole), weights(chunked))


def test_learning_rate_is_read_per_step():
    task = DigitsTask({}, SGD, seed=0)
    start = weights(task).clone()
    task.train(20, lambda step: 0.0)
    assert torch.equal(weights(task), start)  # lr 0: nothing moves
    task.train(1, lambda step: 0.1 if step == 20 else 0.0)
    assert not torch.equal(weights(task), start)


def test_huge_learning_rate_is_flagged_as_diverged_and_spends_its_budget():
    task = DigitsTask({}, SGD, seed=0)
    metrics = task.train(40, lambda step: 1e4)
    assert task.step == 40
    assert has_diverged(metrics["loss"], task.divergence_loss)
    sane = DigitsTask({}, SGD, seed=0).train(40, lambda step: 0.05)
    assert not has_diverged(sane["loss"], task.divergence_loss)
    assert has_diverged(math.nan, None) and not has_diverged(1e6, None)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"hidden": "wide"}, "hidden"),
        ({"batch_size": 0}, "batch_size"),
        ({"device": "tpu"}, "device"),
        ({"dropout": 0.1}, "dropout"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=f"task_options.{field}"):
        build_task("digits", options, SGD, 0)


def test_digits_cache_equals_scikit_learn_and_survives_bad_caches(tmp_path, monkeypatch):
    import numpy as np
    from sklearn.datasets import load_digits

    from metaopt.tasks import datasets

    oracle = load_digits()
    monkeypatch.setenv("METAOPT_CACHE_DIR", str(tmp_path / "cache"))
    cached_file = tmp_path / "cache" / datasets.DIGITS_FILE
    first = datasets.digits_arrays()  # read through scikit-learn, cache written
    assert cached_file.exists()
    second = datasets.digits_arrays()  # read from the cache file
    for pixels, labels in (first, second):
        np.testing.assert_array_equal(pixels, oracle.data)
        np.testing.assert_array_equal(labels, oracle.target)
        assert pixels.dtype == np.uint8 and labels.dtype == np.int64
    cached_file.write_bytes(b"not an npz")  # a broken cache: read through scikit-learn and rewrite it
    np.testing.assert_array_equal(datasets.digits_arrays()[0], oracle.data)
    np.testing.assert_array_equal(np.load(cached_file)["labels"], oracle.target)
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("METAOPT_CACHE_DIR", str(blocked / "cache"))  # cannot be created: no cache, same data
    np.testing.assert_array_equal(datasets.digits_arrays()[1], oracle.target)
    assert not (blocked / "cache").exists()
