"""Federated datasets: one train and one validation shard per client, IID, label-skewed (Dirichlet) or natural.

Non-IID splits follow Hsu et al. 2019 ("Measuring the Effects of Non-Identical Data Distribution"), as used
by FedHyper (Wang et al. ICLR 2024, alpha = 0.5): for every class, the class's samples are divided among the
clients in proportions drawn from Dirichlet(alpha); small alpha = each client sees few classes. The natural
split keeps the dataset's own groups whole (a writer in FEMNIST, a user in Shakespeare: LEAF, Caldas et al.
2018): the groups are shuffled (seeded) and dealt to the clients round-robin.

Built-in datasets: ``digits`` (scikit-learn, ships with the package), ``synthetic`` (a seeded Gaussian-mixture
classification task, any size), and ``fashion_mnist`` / ``cifar10`` read from a local directory holding the
original files (IDX files; CIFAR-10's python batches) -- nothing is downloaded; a missing directory or file is
a clear error naming the path.

The researcher's own data (:func:`load_dataset` tells them apart by :func:`metaopt.federated.config.dataset_kind`):
a ``make_data()`` function, a ``.npz`` file (arrays ``x``, ``y``, optional groups; read without pickle), a
``.csv`` file (pandas: a label column, numeric features, an optional group column) or a folder of images (one
subfolder per class, read with Pillow). Every file read is capped in size, and whatever is wrong -- a missing
array or column, an unreadable image, an empty folder, labels that are not class ids, lengths that differ -- is
one :class:`~metaopt.errors.ConfigError` on ``dataset`` naming the file.
"""

from __future__ import annotations

import gzip
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaopt import user_code
from metaopt.config import is_dir, quote, quote_path
from metaopt.errors import ConfigError
from metaopt.federated.names import DATASETS, PARTITIONS, dataset_kind, unknown_dataset

#: Largest .npz or .csv file read (bytes on disk).
MAX_DATA_FILE_BYTES = 2 * 1024**3
#: Largest array read from a .npz file (bytes once decompressed).
MAX_ARRAY_BYTES = 4 * 1024**3
#: Most images read from a folder, largest image file, and most float32 values the images may become.
MAX_IMAGES = 200_000
MAX_IMAGE_FILE_BYTES = 64 * 1024**2
MAX_IMAGE_VALUES = 2**30
#: Files read as images (by suffix, any case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class Dataset:
    """What a federation trains on: ``x`` [n, *sample_shape] float32, ``y`` [n] int64 class ids in
    [0, num_classes), and optionally ``groups`` [n] int64 (who wrote / owns each sample; partition natural)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    groups: torch.Tensor | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape (a model factory's ``input_shape``)."""
        return tuple(int(d) for d in self.x.shape[1:])


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


def natural_split(groups: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Whole groups per client: the distinct groups, shuffled, dealt round-robin (client i gets groups
    i, i + N, i + 2N, ... of the shuffled order); no group is ever split between clients."""
    distinct = np.unique(groups)
    if len(distinct) < num_clients:
        raise ConfigError(
            "partition",
            f"natural: the dataset has {len(distinct)} groups, fewer than the {num_clients} clients "
            f"(each client holds one group or more); use num_clients <= {len(distinct)}",
        )
    dealt = rng.permutation(distinct)
    parts = [np.flatnonzero(np.isin(groups, dealt[client::num_clients])) for client in range(num_clients)]
    for client, part in enumerate(parts):
        if len(part) < 2:
            raise ConfigError(
                "partition",
                f"natural: client {client}'s groups hold {len(part)} sample; each client needs 2 "
                "(train + validation); use fewer clients",
            )
    return parts


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
    elif partition == "natural":
        if data.groups is None:
            raise ConfigError("partition", "natural splits by group, and the dataset has no groups")
        parts = natural_split(data.groups.numpy(), num_clients, rng)
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


def section_dataset(section: Any, seed: int, *, base: str | None = None) -> Dataset:
    """The dataset a ``federated:`` section (:class:`~metaopt.federated.config.FederatedSection`) names, built-in
    or the researcher's own (a ``module:function`` imported from ``base``, default
    :func:`metaopt.user_code.user_dir`)."""
    return load_dataset(
        section.dataset,
        section.data_root,
        seed=seed,
        label_column=section.label_column,
        group_column=section.group_column,
        image_size=section.image_size,
        image_mode=section.image_mode,
        base=base,
    )


def load_dataset(
    name: str,
    root: str | None = None,
    *,
    synthetic_samples: int = 4000,
    seed: int = 0,
    label_column: str = "label",
    group_column: str = "groups",
    image_size: int = 32,
    image_mode: str = "RGB",
    base: str | None = None,
) -> Dataset:
    """A built-in dataset by name, or the researcher's own (see the module's docstring)."""
    kind = dataset_kind(name)
    if kind == "function":
        return load_user_data(name, base=base)
    if kind == "npz":
        return load_npz(Path(name), group_column)
    if kind == "csv":
        return load_csv(Path(name), label_column, group_column)
    if kind == "images":
        if not is_dir(Path(name)):
            raise ConfigError("dataset", unknown_dataset(name, Path(name).absolute()))
        return load_image_folder(Path(name), image_size, image_mode)
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


# ---- the researcher's own data ------------------------------------------------------------------------------


def load_user_data(reference: str, *, base: str | None = None) -> Dataset:
    """``make_data()`` from the user's module: ``(x, y)``, ``(x, y, groups)`` or a :class:`Dataset`. A reference
    to such a value itself (the Python API's dataset in memory, a ``pickle:`` object) is taken as it is."""
    try:
        target = user_code.load(reference, base=base)
        if callable(target):
            user_code.check_signature(target, reference, ())
            result = user_code.call(target, reference)
        else:
            result = target
        if isinstance(result, Dataset):
            return as_dataset(result.x, result.y, result.groups, source=quote(reference), classes=result.num_classes)
        user_code.expect(
            result,
            reference,
            isinstance(result, tuple | list) and len(result) in (2, 3),
            "(x, y) or (x, y, groups) arrays, or a metaopt.federated.data.Dataset",
        )
    except ConfigError as err:
        raise ConfigError(err.field or "dataset", err.problem) from None
    return as_dataset(*result, source=quote(reference))


def as_dataset(x: Any, y: Any, groups: Any = None, *, source: str, classes: int | None = None) -> Dataset:
    """Arrays (numpy or torch) checked and converted: ``x`` numeric and finite, [n, ...] with n >= 2; ``y`` [n]
    integer class ids >= 0 (``num_classes`` = max + 1, or ``classes`` when given); ``groups`` [n], any ids
    (renumbered 0..G-1). A problem is one line on ``dataset`` naming ``source``."""

    def fail(problem: str) -> ConfigError:
        return ConfigError("dataset", f"{source}: {problem}")

    x, y = _array(x, "x", fail), _array(y, "y", fail)
    if x.dtype.kind not in "biuf":
        raise fail(f"x must hold numbers, not {x.dtype}")
    if x.ndim < 2 or len(x) < 2:
        raise fail(f"x must be [samples, features...] with 2 samples or more; its shape is {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise fail(f"y must be [samples] like x ({len(x)} samples); its shape is {y.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # checked after the cast: 1e39 is inf in float32
        features = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(features).all():
        raise fail("x holds NaN or infinite values (or beyond float32's range, about ±3.4e38)")
    labels = _class_ids(y, fail)
    num_classes = int(labels.max()) + 1
    if classes is not None:
        if classes < num_classes:
            raise fail(f"num_classes is {classes} but y holds class {num_classes - 1}")
        num_classes = classes
    if num_classes < 2:
        raise fail("y holds one class; a classifier needs 2 or more")
    group_ids = None
    if groups is not None:
        groups = _array(groups, "groups", fail)
        if groups.ndim != 1 or len(groups) != len(x):
            raise fail(f"groups must be [samples] like x ({len(x)} samples); its shape is {groups.shape}")
        missing = _missing_ids(groups)
        if missing:
            raise fail(f"groups has {missing} missing ids (NaN or None); give every sample its group")
        try:
            group_ids = torch.as_tensor(np.unique(groups, return_inverse=True)[1].reshape(-1), dtype=torch.int64)
        except TypeError as err:
            raise fail(f"groups cannot be compared with each other ({err})") from None
    return Dataset(torch.as_tensor(features), torch.as_tensor(labels, dtype=torch.int64), num_classes, group_ids)


def _array(value: Any, name: str, fail) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise fail(f"{name} is a {type(value).__name__}; expected a numpy array or a torch tensor")


def _missing_ids(ids: np.ndarray) -> int:
    """How many entries of ``ids`` are missing: NaN (floats), or None / NaN in an object array."""
    if ids.dtype.kind in "fc":
        return int(np.isnan(ids).sum())
    if ids.dtype.kind == "O":
        return sum(1 for value in ids if value is None or (isinstance(value, float) and math.isnan(value)))
    return 0


def _class_ids(y: np.ndarray, fail) -> np.ndarray:
    """Labels as int64 class ids: integers (or floats holding whole numbers) >= 0."""
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.equal(np.mod(y, 1), 0).all():
            raise fail("y must hold integer class ids 0..K-1; it holds non-integer values")
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise fail(f"y must hold integer class ids 0..K-1, not {y.dtype}")
    if len(y) and y.min() < 0:
        raise fail(f"y must hold class ids >= 0; it holds {int(y.min())}")
    return y.astype(np.int64)


def _capped_file(path: Path, what: str) -> None:
    """A regular file of at most :data:`MAX_DATA_FILE_BYTES`, or one error line naming it."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ConfigError("dataset", f"{quote_path(path)}: cannot read {what} ({err.strerror})") from None
    if not path.is_file():
        raise ConfigError("dataset", f"{quote_path(path)}: not a regular file; expected {what}")
    if size > MAX_DATA_FILE_BYTES:
        raise ConfigError("dataset", f"{quote_path(path)}: {size} bytes, over the {MAX_DATA_FILE_BYTES} read")


def load_npz(path: Path, group_key: str = "groups") -> Dataset:
    """A ``.npz`` (``np.savez``) holding arrays ``x``, ``y`` and optionally ``group_key``; read without pickle
    (object arrays are refused) and each array's decompressed size checked before it is read."""
    _capped_file(path, "a .npz file")
    where = quote_path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise ConfigError(
                    "dataset", f"{where}: no array {' or '.join(missing)} (it holds {', '.join(archive.files)})"
                )
            keys = ["x", "y"] + ([group_key] if group_key in archive.files else [])
            for key in keys:
                size = archive.zip.getinfo(f"{key}.npy").file_size
                if size > MAX_ARRAY_BYTES:
                    raise ConfigError("dataset", f"{where}: array {key} is {size} bytes, over the {MAX_ARRAY_BYTES}")
            arrays = {key: archive[key] for key in keys}
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ConfigError("dataset", f"{where}: not a readable .npz file ({type(err).__name__}: {err})") from None
    return as_dataset(arrays["x"], arrays["y"], arrays.get(group_key), source=where)


def load_csv(path: Path, label_column: str = "label", group_column: str = "groups") -> Dataset:
    """A ``.csv`` with a header: ``label_column`` (integer class ids, or class names numbered in sorted order),
    an optional ``group_column``, and every other column a numeric feature."""
    import pandas as pd

    _capped_file(path, "a .csv file")
    where = quote_path(path)
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise ConfigError("dataset", f"{where}: not a readable .csv file ({type(err).__name__}: {err})") from None
    columns = [str(c) for c in table.columns]
    if label_column not in columns:
        raise ConfigError(
            "dataset", f"{where}: no column {quote(label_column)} (label_column); columns: {', '.join(columns)}"
        )
    features = [c for c in table.columns if str(c) not in (label_column, group_column)]
    if not features:
        raise ConfigError("dataset", f"{where}: no feature columns besides the label and group columns")
    for column in features:
        if not pd.api.types.is_numeric_dtype(table[column]):
            raise ConfigError("dataset", f"{where}: column {quote(str(column))} is not numeric")
        if table[column].isna().any():
            raise ConfigError("dataset", f"{where}: column {quote(str(column))} has empty or NaN values")
    labels = table[label_column]
    if labels.isna().any():
        raise ConfigError("dataset", f"{where}: column {quote(label_column)} has empty values")
    if not pd.api.types.is_numeric_dtype(labels):  # class names: numbered in sorted order
        labels = pd.Series(np.unique(labels.astype(str), return_inverse=True)[1].reshape(-1))
    groups = None
    if group_column in columns:
        if table[group_column].isna().any():
            raise ConfigError("dataset", f"{where}: column {quote(group_column)} has empty values (missing group ids)")
        groups = table[group_column].astype(str).to_numpy()
    return as_dataset(table[features].to_numpy(), labels.to_numpy(), groups, source=where)


def image_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, (image file, class id) pairs): one subfolder of ``root`` per class, sorted by name; its
    images found at any depth below it. An empty folder or class is one error line naming it."""
    where = quote_path(root)
    try:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise ConfigError("dataset", f"{where}: cannot list the folder ({err.strerror})") from None
    if not classes:
        raise ConfigError("dataset", f"{where}: no class subfolders (expected a folder of images per class)")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(
            p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not found:
            raise ConfigError(
                "dataset", f"{quote_path(root / name)}: no images ({', '.join(IMAGE_SUFFIXES)}) in class {name}"
            )
        files += [(p, label) for p in found]
        if len(files) > MAX_IMAGES:
            raise ConfigError("dataset", f"{where}: more than {MAX_IMAGES} images")
    return classes, files


def load_image_folder(root: Path, image_size: int = 32, image_mode: str = "RGB") -> Dataset:
    """Images, one subfolder per class (torchvision's ImageFolder layout), read with Pillow in ``image_mode``
    (RGB: 3 channels, L: 1), resized to ``image_size`` x ``image_size``: x is [n, C, H, W] floats in [0, 1]."""
    classes, files = image_files(root)
    channels = 3 if image_mode == "RGB" else 1
    values = len(files) * channels * image_size**2
    if values > MAX_IMAGE_VALUES:
        raise ConfigError(
            "dataset",
            f"{quote_path(root)}: {len(files)} images of {channels}x{image_size}x{image_size} are {values} "
            f"values, over the {MAX_IMAGE_VALUES} read; lower image_size",
        )
    x = np.empty((len(files), channels, image_size, image_size), dtype=np.float32)
    for i, (path, _) in enumerate(files):
        x[i] = read_image(path, image_size, image_mode)
    y = np.asarray([label for _, label in files], dtype=np.int64)
    return as_dataset(x, y, source=quote_path(root), classes=len(classes))


def read_image(path: Path, image_size: int, image_mode: str) -> np.ndarray:
    """One image as [C, H, W] floats in [0, 1]; a file too large or that Pillow cannot read is one error line."""
    from PIL import Image

    try:
        if path.stat().st_size > MAX_IMAGE_FILE_BYTES:
            raise ConfigError("dataset", f"{quote_path(path)}: over {MAX_IMAGE_FILE_BYTES} bytes")
        with Image.open(path) as image:
            pixels = image.convert(image_mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.asarray(pixels, dtype=np.float32) / 255.0
    except ConfigError:
        raise
    except Exception as err:  # Pillow's errors for a broken or hostile file are many (OSError, DecompressionBomb...)
        raise ConfigError("dataset", f"{quote_path(path)}: not a readable image ({type(err).__name__})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


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
