"""Federated data: IID and Dirichlet label-skew splits, per-client train/validation shards, local datasets."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from metaopt.errors import ConfigError
from metaopt.federated.data import (
    dirichlet_split,
    iid_split,
    label_histograms,
    load_dataset,
    make_client_shards,
)


def test_iid_split_is_a_partition_of_near_equal_parts():
    parts = iid_split(103, 10, np.random.default_rng(0))
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(103))
    assert {len(p) for p in parts} <= {10, 11}


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_split_is_a_partition_and_skew_grows_as_alpha_shrinks(alpha):
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_split(labels, 10, alpha, np.random.default_rng(1))
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    assert min(len(p) for p in parts) >= 2


def test_label_skew_is_stronger_for_small_alpha():
    data = load_dataset("digits")

    def skew(alpha: float) -> float:
        shards = make_client_shards(data, 10, "dirichlet", alpha, 0.2, seed=0)
        hist = label_histograms(shards, 10).astype(float)
        share = hist / hist.sum(axis=1, keepdims=True)
        return float(share.max(axis=1).mean())  # mean share of each client's most common label

    iid = make_client_shards(data, 10, "iid", 0.5, 0.2, seed=0)
    iid_share = label_histograms(iid, 10) / label_histograms(iid, 10).sum(axis=1, keepdims=True)
    assert skew(0.1) > skew(0.5) > skew(100.0) >= float(iid_share.max(axis=1).mean()) - 0.05


def test_client_shards_hold_disjoint_train_and_validation():
    data = load_dataset("synthetic", synthetic_samples=500)
    shards = make_client_shards(data, 5, "iid", 0.5, 0.25, seed=3)
    assert sum(s.num_train + len(s.val_y) for s in shards) == 500
    for s in shards:
        assert len(s.val_y) == pytest.approx(0.25 * (s.num_train + len(s.val_y)), abs=1)
        train_rows = {tuple(r) for r in s.train_x.numpy().round(6)}
        assert not any(tuple(r) in train_rows for r in s.val_x.numpy().round(6))


@pytest.mark.parametrize(
    "kwargs, field, hint",
    [
        ({"alpha": 0.0, "partition": "dirichlet"}, "alpha", "> 0"),
        ({"alpha": -1.0, "partition": "dirichlet"}, "alpha", "> 0"),
        ({"num_clients": 300}, "num_clients", "at least 600 samples"),
        ({"partition": "shards"}, "partition", "iid, dirichlet"),
        ({"val_fraction": 1.0}, "val_fraction", "(0, 1)"),
    ],
)
def test_bad_split_settings_are_one_clear_error(kwargs, field, hint):
    data = load_dataset("synthetic", synthetic_samples=500)
    settings = {"num_clients": 5, "partition": "iid", "alpha": 0.5, "val_fraction": 0.2, "seed": 0, **kwargs}
    with pytest.raises(ConfigError) as err:
        make_client_shards(data, **settings)
    assert err.value.field == field and hint in err.value.problem


def test_local_datasets_name_the_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="needs data_root"):
        load_dataset("cifar10")
    with pytest.raises(ConfigError, match=str(tmp_path / "nowhere")):
        load_dataset("fashion_mnist", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="data_batch_1"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_fashion_mnist_reader_reads_idx_files(tmp_path):
    """A small file in the original IDX layout (big-endian dims, uint8 payload), gzipped as distributed."""
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape) + images.tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (7).to_bytes(4, "big") + labels.tobytes())
    data = load_dataset("fashion_mnist", str(tmp_path))
    assert data.x.shape == (7, 784) and data.num_classes == 10
    torch.testing.assert_close(data.x[3], torch.tensor(images[3].reshape(-1) / 255.0, dtype=torch.float32))
    assert data.y.tolist() == list(range(7))
