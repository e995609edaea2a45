"""Datasets that ship inside packages, read once and kept in a local cache.

scikit-learn's digits (1,797 8x8 images, pixel values 0-16) is the data of the digits task, the federated
digits runs and the symbolic-search proxies. Reading it through scikit-learn costs about a CPU-second per
process (figure in benchmarks/results.csv), almost all of it ``import sklearn`` (scipy.stats among others); a
PBT sweep pays that in every trial process it starts. So the arrays are read through scikit-learn once and kept
as a small ``.npz`` file (≈ 120 kB) in the cache directory; later processes read that with numpy alone.

The cache directory is :func:`metaopt.cache.cache_dir`. A cache that cannot be written (read-only home) or read
(a broken file) only costs the scikit-learn read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from metaopt.cache import cache_dir, write_atomically

DIGITS_FILE = "sklearn_digits_v1.npz"


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(pixels uint8 [1797, 64] in 0..16, labels int64 [1797])``."""
    path = cache_dir() / DIGITS_FILE
    try:
        with np.load(path) as cached:
            return cached["pixels"], cached["labels"]
    except (OSError, ValueError, KeyError):
        pass
    from sklearn.datasets import load_digits

    raw = load_digits()
    pixels, labels = raw.data.astype(np.uint8), raw.target.astype(np.int64)

    def write_npz(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(handle, pixels=pixels, labels=labels)

    write_atomically(path, write_npz)  # no cache: the next process reads through scikit-learn again
    return pixels, labels


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as model inputs: ``(features float32 [1797, 64] scaled to [0, 1], labels int64 [1797])``."""
    pixels, labels = digits_arrays()
    return torch.tensor(pixels / 16.0, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)
