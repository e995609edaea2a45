"""Federated datasets: one train and one validation shard per client, IID or label-skewed (Dirichlet).

Non-IID splits follow Hsu et al. 2019 ("Measuring the Effects of Non-Identical Data Distribution"), as used
by FedHyper (Wang et al. ICLR 2024, alpha = 0.5): for every class, the class's samples are divided among the
clients in proportions drawn from Dirichlet(alpha); small alpha = each client sees few classes.

Datasets: ``digits`` (scikit-learn, ships with the package), ``synthetic`` (a seeded Gaussian-mixture
classification task, any size), and ``fashion_mnist`` / ``cifar10`` read from a local directory holding the
original files (IDX files; CIFAR-10's python batches) -- nothing is downloaded; a missing directory or file is
a clear error naming the path.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metaopt.errors import ConfigError
from metaopt.federated.config import DATASETS, PARTITIONS


@dataclass(frozen=True)
class Dataset:
    x: torch.Tensor  # [n, features...] float32
    y: torch.Tensor  # [n] int64
    num_classes: int


@dataclass(frozen=True)
class ClientShard:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    @property
    def num_train(self) -> int:
        return len(self.train_y)


def iid_split(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into ``num_clients`` near-equal parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_clients)]


def dirichlet_split(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Per class, proportions ~ Dirichlet(alpha) over clients; redrawn until every client has ``min_size``."""
    if alpha <= 0:
        raise ConfigError("alpha", f"must be > 0 (got {alpha})")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(members)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        "alpha",
        f"with alpha {alpha} some of the {num_clients} clients keep getting fewer than {min_size} samples "
        f"in {max_tries} draws; use fewer clients or a larger alpha",
    )


def make_client_shards(
    data: Dataset, num_clients: int, partition: str, alpha: float, val_fraction: float, seed: int
) -> list[ClientShard]:
    """Split ``data`` over clients, then each client's part into its own train and validation shards."""
    n = len(data.y)
    if num_clients < 1:
        raise ConfigError("num_clients", f"must be >= 1 (got {num_clients})")
    if num_clients * 2 > n:
        raise ConfigError(
            "num_clients",
            f"{num_clients} clients need at least {2 * num_clients} samples "
            f"(train + validation each); the dataset has {n}",
        )
    if not 0 < val_fraction < 1:
        raise ConfigError("val_fraction", f"must be in (0, 1) (got {val_fraction})")
    rng = np.random.default_rng(seed)
    if partition == "iid":
        parts = iid_split(n, num_clients, rng)
    elif partition == "dirichlet":
        parts = dirichlet_split(data.y.numpy(), num_clients, alpha, rng)
    else:
        raise ConfigError("partition", f"unknown partition {partition!r}; allowed: {', '.join(PARTITIONS)}")
    shards = []
    for part in parts:
        part = rng.permutation(part)
        n_val = max(1, round(len(part) * val_fraction))
        val, train = torch.as_tensor(part[:n_val]), torch.as_tensor(part[n_val:])
        shards.append(ClientShard(data.x[train], data.y[train], data.x[val], data.y[val]))
    return shards


def label_histograms(shards: list[ClientShard], num_classes: int) -> np.ndarray:
    """[clients, classes] counts of training labels (how skewed a split is)."""
    return np.stack([np.bincount(s.train_y.numpy(), minlength=num_classes) for s in shards])


# ---- datasets ----------------------------------------------------------------------------------------------


def load_dataset(name: str, root: str | None = None, *, synthetic_samples: int = 4000, seed: int = 0) -> Dataset:
    if name == "digits":
        from metaopt.tasks.datasets import digits_tensors

        return Dataset(*digits_tensors(), 10)
    if name == "synthetic":
        return synthetic_classification(synthetic_samples, seed=seed)
    if name in ("fashion_mnist", "cifar10"):
        if not root:
            raise ConfigError(
                "data_root", f"{name} needs data_root: a local directory holding its files (nothing is downloaded)"
            )
        path = Path(root).expanduser()
        if not path.is_dir():
            raise ConfigError("data_root", f"{path}: no such directory (expected the {name} files there)")
        return _fashion_mnist(path) if name == "fashion_mnist" else _cifar10(path)
    raise ConfigError("dataset", f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")


def synthetic_classification(samples: int, features: int = 20, classes: int = 5, seed: int = 0) -> Dataset:
    """Gaussian clusters (two per class) in ``features`` dimensions: linearly hard, learnable by an MLP."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, size=(classes * 2, features))
    which = rng.integers(0, classes * 2, size=samples)
    x = centres[which] + rng.normal(0, 1.0, size=(samples, features))
    return Dataset(torch.tensor(x, dtype=torch.float32), torch.tensor(which % classes), classes)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find(root: Path, names: list[str]) -> Path:
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.exists():
                return candidate
    raise ConfigError("data_root", f"{root}: none of {', '.join(names)} (or .gz) found")


def _fashion_mnist(root: Path) -> Dataset:
    """The original IDX files (train only: clients hold validation shards of their own)."""
    images = _read_idx(_find(root, ["train-images-idx3-ubyte"]))
    labels = _read_idx(_find(root, ["train-labels-idx1-ubyte"]))
    x = torch.tensor(images.reshape(len(images), -1) / 255.0, dtype=torch.float32)
    return Dataset(x, torch.tensor(labels.astype(np.int64)), 10)


def _cifar10(root: Path) -> Dataset:
    """CIFAR-10's python batches (``data_batch_1`` .. ``data_batch_5``), images as [n, 3, 32, 32] in [0, 1]."""
    xs, ys = [], []
    for i in range(1, 6):
        path = root / f"data_batch_{i}"
        if not path.exists():
            raise ConfigError("data_root", f"{path}: missing (expected CIFAR-10's python batches in {root})")
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")  # the dataset's own format; a local file the user gave
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    x = torch.tensor(np.concatenate(xs).reshape(-1, 3, 32, 32) / 255.0, dtype=torch.float32)
    return Dataset(x, torch.tensor(np.concatenate(ys)), 10)
