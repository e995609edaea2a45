"""Federated learning on the researcher's own data and model (issue 22, item 3): a ``make_data`` function, ``.npz``,
``.csv`` and image-folder datasets, the natural (by group) partition, the small CNN and a user's model factory;
every mistake one error line before Ray starts, and one real ``metaopt run`` from a folder outside the package."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_metaopt_from
from metaopt import cli, config, user_code
from metaopt.errors import ConfigError
from metaopt.federated.clients import Client, InProcessClients, build_model, check_model, small_cnn
from metaopt.federated.data import (
    Dataset,
    as_dataset,
    load_csv,
    load_dataset,
    load_image_folder,
    load_npz,
    make_client_shards,
    natural_split,
)
from metaopt.federated.names import dataset_kind
from metaopt.federated.rounds import FederatedRun, RoundSettings
from metaopt.federated.strategies import make_strategy

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_federated"


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """The user's directory: the current one, its modules importable; sys.path restored and the modules written
    there (a fresh name per test) dropped afterwards. sys.modules itself is not swapped: torch imports sympy
    lazily, and a copied module table breaks that import."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv(user_code.USER_DIR_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for module in tmp_path.glob("*.py"):
        sys.modules.pop(module.stem, None)


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


def grouped_arrays(n: int = 60, groups: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, n), np.arange(n) % groups


# ---- loaders ------------------------------------------------------------------------------------------------


def test_dataset_values_are_told_apart():
    assert [dataset_kind(v) for v in ("digits", "my.data:make", "a/b.NPZ", "t.csv", "photos", "./digits")] == [
        "builtin",
        "function",
        "npz",
        "csv",
        "images",
        "images",
    ]


def test_npz_with_groups_loads_and_its_mistakes_name_the_file(tmp_path):
    x, y, groups = grouped_arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y, writer=np.array([f"w{g}" for g in groups]))
    data = load_npz(tmp_path / "d.npz", "writer")
    assert data.x.shape == (60, 5) and data.x.dtype == torch.float32 and data.num_classes == int(y.max()) + 1
    assert data.y.tolist() == y.tolist() and data.groups.tolist() == groups.tolist()  # "w0".."w5" -> 0..5
    assert load_npz(tmp_path / "d.npz").groups is None  # no array "groups": none
    np.savez(tmp_path / "no_y.npz", x=x)
    with pytest.raises(ConfigError, match=r"no_y.npz'?: no array y \(it holds x\)"):
        load_npz(tmp_path / "no_y.npz")
    np.savez(tmp_path / "objects.npz", x=np.array([object()] * 3), y=np.zeros(3, dtype=int))
    with pytest.raises(ConfigError, match=r"objects.npz.*not a readable .npz"):  # pickled objects are refused
        load_npz(tmp_path / "objects.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match=r"text.npz.*not a readable .npz"):
        load_npz(tmp_path / "text.npz")


def test_csv_with_class_names_and_a_group_column(tmp_path):
    rows = ["f1,f2,species,site"] + [f"{i},{i % 3 * 0.5},{'cat' if i % 2 else 'ant'},s{i % 4}" for i in range(12)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    data = load_csv(tmp_path / "t.csv", label_column="species", group_column="site")
    assert data.x.shape == (12, 2) and data.num_classes == 2  # the group column is not a feature
    assert data.y.tolist() == [i % 2 for i in range(12)]  # names numbered in sorted order: ant 0, cat 1
    assert data.groups.tolist() == [i % 4 for i in range(12)]
    with pytest.raises(ConfigError, match=r"t.csv'?: no column 'label' \(label_column\); columns: f1, f2, species"):
        load_csv(tmp_path / "t.csv")
    (tmp_path / "words.csv").write_text("a,label\nx,0\ny,1\n")
    with pytest.raises(ConfigError, match=r"words.csv'?: column 'a' is not numeric"):
        load_csv(tmp_path / "words.csv")


def test_values_beyond_float32_are_refused_after_the_cast_naming_the_file(tmp_path):
    """1e39 is finite in float64 but inf once cast to the float32 the model trains on: one line naming the file."""
    x, y, _ = grouped_arrays(n=8)
    big = x.astype(np.float64)
    big[3, 1] = 1e39
    np.savez(tmp_path / "big.npz", x=big, y=y)
    with pytest.raises(ConfigError, match=r"big.npz'?: x holds NaN or infinite values \(or beyond float32's range"):
        load_npz(tmp_path / "big.npz")
    big[3, 1] = 3e38  # within float32's range: kept
    assert torch.isfinite(as_dataset(big, y, source="arrays").x).all()


def test_missing_group_ids_are_refused_not_pooled_into_one_group(tmp_path):
    """An empty group cell (pandas reads NaN, which would become the group "nan") or NaN / None group ids in
    arrays would silently pool those samples into one client: one line naming the file instead."""
    rows = ["f1,label,site"] + [f"{i},{i % 2},{'' if i == 4 else f's{i % 3}'}" for i in range(8)]
    (tmp_path / "holes.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match=r"holes.csv'?: column 'site' has empty values \(missing group ids\)"):
        load_csv(tmp_path / "holes.csv", group_column="site")
    x, y, groups = grouped_arrays(n=8)
    float_groups = groups.astype(np.float64)
    float_groups[2] = np.nan
    np.savez(tmp_path / "holes.npz", x=x, y=y, groups=float_groups)
    with pytest.raises(ConfigError, match=r"holes.npz'?: groups has 1 missing ids \(NaN or None\)"):
        load_npz(tmp_path / "holes.npz")
    with pytest.raises(ConfigError, match=r"mine: groups has 2 missing ids"):
        as_dataset(x, y, np.array(["a", None, "b", float("nan"), "a", "b", "a", "b"], dtype=object), source="mine")
    assert as_dataset(x, y, groups.astype(np.float64), source="m").groups.tolist() == groups.tolist()  # none missing


def write_image_folder(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            size = (10 + i, 12)  # images of different sizes: all resized
            pixels = rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_reads_classes_resized_to_floats(tmp_path):
    write_image_folder(tmp_path / "imgs", {"cats": 3, "dogs": 2})
    data = load_image_folder(tmp_path / "imgs", image_size=8)
    assert data.x.shape == (5, 3, 8, 8) and data.num_classes == 2 and data.y.tolist() == [0, 0, 0, 1, 1]
    assert float(data.x.min()) >= 0 and float(data.x.max()) <= 1 and float(data.x.std()) > 0.1
    gray = load_image_folder(tmp_path / "imgs", image_size=6, image_mode="L")
    assert gray.x.shape == (5, 1, 6, 6)
    (tmp_path / "imgs" / "dogs" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"broken.png'?: not a readable image"):
        load_image_folder(tmp_path / "imgs", image_size=8)
    (tmp_path / "imgs" / "birds").mkdir()
    with pytest.raises(ConfigError, match=r"birds'?: no images"):
        load_image_folder(tmp_path / "imgs", image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty'?: no class subfolders"):
        load_image_folder(tmp_path / "empty")


def test_a_users_data_function_and_what_it_may_return(user_folder):
    write_module(
        user_folder,
        "fed_data_a",
        """
        import numpy as np, torch
        from metaopt.federated.data import Dataset

        def tensors():
            return torch.rand(10, 2, 3), torch.arange(10) % 4

        def dataset():
            return Dataset(torch.rand(6, 3), torch.tensor([0, 1, 0, 1, 0, 1]), 5)

        def a_dict():
            return {"x": 1}

        def short_y():
            return np.zeros((5, 2)), np.zeros(4, dtype=int)

        def fractions():
            return np.zeros((4, 2)), np.array([0.0, 0.5, 1.0, 1.0])

        def raises():
            raise OSError("disk on fire")
        """,
    )
    data = load_dataset("fed_data_a:tensors")
    in_memory = user_code.reference_to(Dataset(torch.rand(4, 2), torch.tensor([0, 1, 1, 0]), 2), base=user_folder)
    assert in_memory.startswith("pickle:") and load_dataset(in_memory).x.shape == (4, 2)  # the Python API's data
    assert data.sample_shape == (2, 3) and data.num_classes == 4 and data.groups is None
    assert load_dataset("fed_data_a:dataset").num_classes == 5  # a Dataset keeps its class count
    expected = {
        "a_dict": "returned a dict; expected (x, y) or (x, y, groups)",
        "short_y": "y must be [samples] like x (5 samples); its shape is (4,)",
        "fractions": "y must hold integer class ids 0..K-1; it holds non-integer values",
        "raises": "raised OSError: disk on fire",
    }
    for name, problem in expected.items():
        with pytest.raises(ConfigError) as caught:
            load_dataset(f"fed_data_a:{name}")
        assert caught.value.field == "dataset" and problem in caught.value.problem
        assert "\n" not in str(caught.value)


def test_arrays_are_checked_before_they_become_a_dataset():
    with pytest.raises(ConfigError, match="x holds NaN"):
        as_dataset(np.array([[0.0], [np.nan]]), np.array([0, 1]), source="s")
    with pytest.raises(ConfigError, match="class ids >= 0"):
        as_dataset(np.zeros((2, 1)), np.array([0, -1]), source="s")
    with pytest.raises(ConfigError, match="groups is a list"):
        as_dataset(np.zeros((2, 1)), np.array([0, 1]), ["a", "b"], source="s")


# ---- natural partition ----------------------------------------------------------------------------------------


def test_natural_partition_keeps_groups_whole_and_covers_every_sample_once():
    x, y, groups = grouped_arrays(n=90, groups=9)
    data = as_dataset(x, y, groups, source="s")
    parts = natural_split(groups, 4, np.random.default_rng(3))
    assert sorted(np.concatenate(parts).tolist()) == list(range(90))  # every sample in exactly one client
    owners = [{int(g) for g in groups[p]} for p in parts]
    assert sum(len(o) for o in owners) == 9 and set().union(*owners) == set(range(9))  # no group split
    assert sorted(len(o) for o in owners) == [2, 2, 2, 3]  # dealt round-robin
    shards = make_client_shards(data, 4, "natural", 0.5, 0.2, seed=3)
    for shard, part in zip(shards, parts, strict=True):  # train + validation of a client = its groups' samples
        assert len(shard.train_y) + len(shard.val_y) == len(part)
    again = make_client_shards(data, 4, "natural", 0.5, 0.2, seed=3)
    assert all(torch.equal(a.train_x, b.train_x) for a, b in zip(shards, again, strict=True))  # seeded
    with pytest.raises(ConfigError, match="natural: the dataset has 9 groups, fewer than the 10 clients"):
        make_client_shards(data, 10, "natural", 0.5, 0.2, seed=0)
    with pytest.raises(ConfigError, match="has no groups"):
        make_client_shards(as_dataset(x, y, source="s"), 2, "natural", 0.5, 0.2, seed=0)


# ---- models ---------------------------------------------------------------------------------------------------


def test_small_cnn_answers_logits_for_images_and_square_vectors():
    cnn = small_cnn((3, 12, 12), 7, (32,))
    convolutions = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convolutions] == [(3, 32, (5, 5)), (32, 64, (5, 5))]
    logits = cnn(torch.rand(5, 3, 12, 12))
    assert logits.shape == (5, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in cnn.parameters())
    assert build_model((64,), 10, (16,), "cnn")(torch.rand(2, 64)).shape == (2, 10)  # digits as 1 x 8 x 8
    with pytest.raises(ConfigError, match="cnn needs images"):
        build_model((20,), 5, (16,), "cnn")
    with pytest.raises(ConfigError, match="4 x 4 pixels or more"):
        build_model((1, 3, 3), 5, (16,), "cnn")


def test_a_users_model_is_built_and_checked_on_a_batch(user_folder):
    write_module(
        user_folder,
        "fed_model_a",
        """
        from torch import nn

        def good(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1], num_classes))

        def wrong_width(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1], num_classes + 1))

        def not_a_module(input_shape, num_classes):
            return "a model"
        """,
    )
    data = as_dataset(np.random.default_rng(0).normal(size=(8, 2, 3)), np.arange(8) % 3, source="s")
    check_model("fed_model_a:good", data)
    with pytest.raises(ConfigError, match=r"returned \(2, 4\) for a batch of 2 samples; .* = \(2, 3\)"):
        check_model("fed_model_a:wrong_width", data)
    with pytest.raises(ConfigError, match=r"returned a str; expected a torch\.nn\.Module"):
        check_model("fed_model_a:not_a_module", data)
    shards = make_client_shards(data, 2, "iid", 0.5, 0.25, seed=0)
    clients = InProcessClients(
        [Client(i, s, data.sample_shape, 3, (8,), "fed_model_a:good") for i, s in enumerate(shards)]
    )
    run = FederatedRun(
        shards, clients, make_strategy("fedavg"), RoundSettings(lr0=0.1), data.sample_shape, 3, (8,), "fed_model_a:good"
    )
    assert run.global_params.numel() == 6 * 3 + 3  # the user's Linear(6, 3): its parameters are federated
    before = run.global_params.clone()
    assert run.run_round()["participants"] == 2 and not torch.equal(run.global_params, before)


# ---- one error line before Ray starts -------------------------------------------------------------------------


def run_file(folder: Path, section: dict, capsys) -> tuple[int, str]:
    experiment = {
        "name": "own-fed",
        "kind": "federated",
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
        "federated": {"num_clients": 2, "rounds": 1, "strategies": ["fedavg"], **section},
    }
    (folder / "exp.yaml").write_text(yaml.safe_dump(experiment))
    status = cli.main(["run", "exp.yaml"])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return status, lines[0]


@pytest.mark.parametrize(
    "section, expected",
    [
        ({"dataset": "fed_bad:returns_dict"}, "federated.dataset: 'fed_bad:returns_dict' returned a dict; expected"),
        ({"dataset": "fed_bad:no_such_fn"}, "federated.dataset: 'fed_bad:no_such_fn': fed_bad has no attribute"),
        ({"dataset": "fed_bad:takes_args"}, "federated.dataset: 'fed_bad:takes_args' must accept ()"),
        ({"dataset": "missing.npz"}, "federated.dataset: '"),
        ({"dataset": "data.csv", "label_column": "y"}, "federated.dataset: '"),
        ({"dataset": "dgits"}, "federated.dataset: unknown dataset 'dgits'; allowed: digits, synthetic"),
        ({"dataset": "fed_bad:grouped", "partition": "natural", "num_clients": 4}, "federated.partition: natural:"),
        ({"partition": "natural"}, "federated.partition: natural splits by group, and dataset 'digits' has none"),
        ({"model": "fed_bad:wide_model"}, "federated.model: 'fed_bad:wide_model' returned (2, 11)"),
        ({"model": "fed_bad:two_args"}, "federated.model: 'fed_bad:two_args' must accept (input_shape, num_classes)"),
        ({"model": "transformer"}, "federated.model: unknown model 'transformer'; allowed: mlp, cnn"),
        ({"model": "cnn", "dataset": "synthetic"}, "federated.model: cnn needs images"),
    ],
)
def test_each_mistake_is_one_line_and_exit_2(user_folder, capsys, section, expected):
    write_module(
        user_folder,
        "fed_bad",
        """
        import numpy as np
        from torch import nn

        def returns_dict():
            return {}

        def takes_args(path):
            return None

        def grouped():
            return np.zeros((30, 2)), np.arange(30) % 2, np.arange(30) % 3

        def wide_model(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes + 1))

        def two_args(shape):
            return nn.Identity()
        """,
    )
    (user_folder / "data.csv").write_text("a,label\n1,0\n2,1\n3,0\n4,1\n")
    status, line = run_file(user_folder, section, capsys)
    assert status == 2 and line.startswith(f"metaopt: error: {expected}")
    if section.get("dataset", "").endswith((".npz", ".csv")):
        assert str(user_folder / section["dataset"]) in line  # the file, named whole


def test_the_example_validates_from_its_own_folder(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("data", "model"):  # the example's plain module names: none cached from elsewhere
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delenv(user_code.USER_DIR_VARIABLE, raising=False)
    monkeypatch.chdir(EXAMPLE)
    section = config.load("fed.yaml").section  # imports data.py and model.py, loads the data, runs the model once
    assert (section.dataset, section.model, section.partition) == ("data:make_data", "model:make_model", "natural")
    for name in ("data", "model"):
        sys.modules.pop(name, None)


# ---- metaopt run, from the user's own folder ------------------------------------------------------------------

USER_DATA = """
import os
import numpy as np

def make_data():
    with open(os.path.join(os.path.dirname(__file__), "data_calls.txt"), "a") as f:
        f.write(f"{os.getpid()}\\n")
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = rng.normal(0, 0.3, size=(90, 1, 6, 6)).astype(np.float32)
    x[np.arange(90), 0, 2 * y, :] += 1.0  # class k: a bright row 2k
    return x, y, np.arange(90) % 6  # six writers
"""

USER_MODEL = """
import os
from torch import nn

def make_model(input_shape, num_classes):
    with open(os.path.join(os.path.dirname(__file__), "model_calls.txt"), "a") as f:
        f.write(f"{tuple(input_shape)} {num_classes}\\n")
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[1] * input_shape[2], num_classes))
"""


def test_metaopt_run_trains_the_users_model_on_the_users_data(tmp_path):
    (tmp_path / "my_fed_data.py").write_text(USER_DATA)
    (tmp_path / "my_fed_model.py").write_text(USER_MODEL)
    experiment = {
        "name": "own-fed-run",
        "kind": "federated",
        "ray": {"num_cpus": 2, "cpus_per_trial": 0.5, "max_concurrent_trials": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "federated": {
            "dataset": "my_fed_data:make_data",
            "model": "my_fed_model:make_model",
            "partition": "natural",
            "num_clients": 3,
            "rounds": 2,
            "local_epochs": 2,
            "batch_size": 8,
            "strategies": ["fedavg", "fedhyper_g"],
            "lrs": [0.3],
            "cpus_per_client": 0.25,
        },
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(experiment))
    run = run_metaopt_from(tmp_path, "exp.yaml", "--quiet", timeout=240)
    # make_data ran in the driver (checked before Ray) and in the trial; make_model there once, then for the
    # server of each of the two trials and each of the 3 client actors, always with the data's shape and classes
    assert len((tmp_path / "data_calls.txt").read_text().splitlines()) >= 2
    built = (tmp_path / "model_calls.txt").read_text().splitlines()
    assert len(built) >= 1 + 2 + 3 and set(built) == {"(1, 6, 6) 3"}
    table = {line.split()[0]: line.split() for line in run.stdout.splitlines() if line.startswith("fed")}
    assert set(table) == {"fedavg", "fedhyper_g"}
    assert all(float(row[3]) > 0.5 for row in table.values())  # final accuracy, 3 classes: the user's model learned
