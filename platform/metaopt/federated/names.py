"""The federated capability's names, one list of each, and how a ``dataset`` value is read.

The section (:mod:`metaopt.federated.config`) types its fields by these, and the modules that act on a name (and
import torch, which loading a config must not) check their arguments against the same tuples. A module of its
own, below the section: the section's validation calls into the data and client modules, which need these names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from metaopt import user_code
from metaopt.config import quote, quote_path

#: The built-in datasets (:func:`metaopt.federated.data.load_dataset` loads each by name); ``dataset`` also takes
#: the researcher's own data (:func:`dataset_kind`).
DatasetName = Literal["digits", "synthetic", "fashion_mnist", "cifar10"]
#: How the data is split over clients (:func:`metaopt.federated.data.make_client_shards`).
PartitionName = Literal["iid", "dirichlet", "natural"]
#: The built-in models (:func:`metaopt.federated.clients.build_model`); ``model`` also takes a user factory.
ModelName = Literal["mlp", "cnn"]
#: The clients' local optimizer (:func:`metaopt.federated.clients.local_train`).
ClientOptimizerName = Literal["sgd", "adam"]
DATASETS: tuple[str, ...] = get_args(DatasetName)
PARTITIONS: tuple[str, ...] = get_args(PartitionName)
CLIENT_OPTIMIZERS: tuple[str, ...] = get_args(ClientOptimizerName)
MODELS: tuple[str, ...] = get_args(ModelName)
#: The arguments a user's model factory is called with.
MODEL_FACTORY_PARAMS = ("input_shape", "num_classes")
#: File suffixes read as data files (a dataset path with any other ending is a folder of images).
DATA_FILE_SUFFIXES = (".npz", ".csv")


def dataset_kind(dataset: str) -> str:
    """What a ``dataset`` value names: ``builtin``, ``function`` (a ``module:function`` or ``pickle:`` object),
    ``npz``, ``csv``, or ``images`` (a folder, one subfolder per class). A built-in name wins over a folder of the
    same name (write ``./digits`` for the folder)."""
    if dataset in DATASETS:
        return "builtin"
    if user_code.is_reference(dataset):
        return "function"
    suffix = dataset.lower().rsplit(".", 1)[-1] if "." in dataset else ""
    return suffix if f".{suffix}" in DATA_FILE_SUFFIXES else "images"


def unknown_dataset(dataset: str, path: str | Path) -> str:
    """The error for a ``dataset`` that names nothing: not built in, not a reference or file, no such folder."""
    return (
        f"unknown dataset {quote(dataset)}; allowed: {', '.join(DATASETS)}, a 'module:function', a .npz or .csv "
        f"file, or a folder of images ({quote_path(path)} is not a directory)"
    )
