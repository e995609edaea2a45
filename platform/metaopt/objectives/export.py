"""Export drifts (learned RL objectives) to disk, and load them back in JAX or torch.

An exported drift is a directory with two files and no pickle anywhere:

* ``drift.json`` -- format name and version, the drift's name and resolved options, the
  parameter shapes, the network's input features in order, and the formula in words;
* ``params.npz`` -- the float32 weights as plain numpy arrays (``hidden``: ``[F, H]``,
  ``out``: ``[H, 1]``); empty for the parameter-free ``ppo``/``dpo``.

:func:`load_drift` gives back the JAX ``(drift_fn, params)`` of
:mod:`metaopt.objectives.drifts`. :func:`load_torch_drift` gives a
:class:`TorchDrift`, a ``torch.nn.Module`` that computes the same drift in torch
(float32, differentiable w.r.t. the ratio) for a torch PPO, e.g. inside RLlib:
PPO clipping (Schulman et al. 2017, eq. 7), DPO (Lu et al. 2022, eq. 6), LPO (Lu et
al. 2022, Sec. 4) and TA-LPO (Jackson et al., ICLR 2024), all in the mirror-learning
form ``loss = -E[r*A - D(r, A)]`` (Kuba et al. 2022).

``TorchDrift`` is defined on first use (module ``__getattr__``), so importing this module
and the numpy-only :func:`read_drift` do not import torch.

Missing files raise :class:`FileNotFoundError`, bad ones :class:`ValueError`
(:class:`~metaopt.errors.ConfigError`), each with one line naming the path and the problem.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from metaopt.errors import ConfigError
from metaopt.objectives.drifts import (
    LPO_OFFSET,
    MIN_RATIO,
    DriftSpec,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "load_drift",
    "load_torch_drift",
    "read_drift",
    "save_drift",
]

FORMAT = "metaopt-drift"
FORMAT_VERSION = 1
SPEC_FILE = "drift.json"
PARAMS_FILE = "params.npz"

_FORMULAS = {
    "ppo": "relu((r - clip(r, 1-clip_eps, 1+clip_eps)) * A)",
    "dpo": ("A >= 0: relu((r-1)*A - alpha*tanh((r-1)*A/alpha)); A < 0: relu(log(r)*A - beta*tanh(log(r)*A/beta))"),
    "lpo": (f"relu(tanh(x @ hidden) @ out + relu((r - clip(r, 1-clip_eps, 1+clip_eps)) * A) - {LPO_OFFSET:g})"),
    "ta_lpo": (
        "relu(tanh(x @ hidden) @ out + relu((r - clip(r, 1-clip_eps, 1+clip_eps)) * A)"
        f" - {LPO_OFFSET:g}), x = [x_lpo, fraction*x_lpo] (+ log_horizon*x_lpo with time_inputs="
        "fraction_and_log_horizon)"
    ),
}


# ---------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------


def _numpy_params(spec: DriftSpec, params: Any) -> dict[str, np.ndarray]:
    """The parameters as float32 numpy arrays, checked against the spec's shapes."""
    expected = spec.param_shapes()
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise ConfigError("params", f"must be a dict like {expected or '{}'}, got {type(params).__name__}")
    if set(params) != set(expected):
        want = ", ".join(sorted(expected)) or "none"
        raise ConfigError("params", f"{spec.name} takes keys {want}; got {sorted(params)}")
    arrays = {}
    for key, shape in expected.items():
        array = np.asarray(params[key], dtype=np.float32)
        if array.shape != shape:
            raise ConfigError(f"params.{key}", f"must have shape {list(shape)}, got {list(array.shape)}")
        if not np.all(np.isfinite(array)):
            raise ConfigError(f"params.{key}", "contains non-finite values")
        arrays[key] = array
    return arrays


def save_drift(
    directory: str | os.PathLike[str],
    name: str,
    params: Any,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``drift.json`` and ``params.npz`` into ``directory`` (created); return it.

    ``options`` are those of :func:`~metaopt.objectives.drifts.make_drift` (defaults
    filled in and recorded). ``params`` is ``{}``/``None`` for ppo/dpo. Files are written
    to temporaries and renamed, so a reader never sees half a drift.
    """
    spec = DriftSpec.create(name, **dict(options or {}))
    arrays = _numpy_params(spec, params)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "options": spec.as_dict(),
        "dtype": "float32",
        "params": {key: list(array.shape) for key, array in arrays.items()},
        "num_params": int(sum(array.size for array in arrays.values())),
        "features": list(spec.feature_names()),
        "log_ratio_clamp": MIN_RATIO,
        "formula": _FORMULAS[spec.name],
    }
    params_tmp = directory / f".{PARAMS_FILE}.tmp"
    with open(params_tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(params_tmp, directory / PARAMS_FILE)
    spec_tmp = directory / f".{SPEC_FILE}.tmp"
    spec_tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(spec_tmp, directory / SPEC_FILE)
    return directory


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


def read_drift(directory: str | os.PathLike[str]) -> tuple[DriftSpec, dict[str, np.ndarray]]:
    """The validated spec and numpy parameters of an exported drift (no JAX, no torch)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such drift directory")
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path}: missing; not an exported drift directory")
    try:
        document = json.loads(spec_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(str(spec_path), f"not valid JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConfigError(str(spec_path), f'not a {FORMAT} file (no "format": "{FORMAT}")')
    if document.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            str(spec_path),
            f"format_version {document.get('format_version')!r} unsupported; this code reads {FORMAT_VERSION}",
        )
    options = document.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(str(spec_path), '"options" must be an object')
    _reject_pre_time_inputs(str(spec_path), document, options)
    try:
        spec = DriftSpec.create(document.get("name"), **options)
    except ValueError as err:
        raise ConfigError(str(spec_path), str(err)) from None

    expected = spec.param_shapes()
    declared = document.get("params", {})
    if declared != {key: list(shape) for key, shape in expected.items()}:
        raise ConfigError(
            str(spec_path),
            f'"params" {declared!r} does not match {spec.name} with its options '
            f"(expected { {k: list(v) for k, v in expected.items()} })",
        )
    params_path = directory / PARAMS_FILE
    if not expected:
        return spec, {}
    if not params_path.is_file():
        raise FileNotFoundError(f"{params_path}: missing; {spec.name} needs its weights")
    try:
        with np.load(params_path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(str(params_path), f"not a readable .npz archive ({message})") from None
    if set(arrays) != set(expected):
        raise ConfigError(str(params_path), f"holds arrays {sorted(arrays)}; {spec.name} needs {sorted(expected)}")
    for key, shape in expected.items():
        array = arrays[key]
        if array.shape != shape or not np.issubdtype(array.dtype, np.floating):
            raise ConfigError(
                str(params_path),
                f"array {key!r} is {array.dtype}{list(array.shape)}, expected float32{list(shape)}",
            )
        if not np.all(np.isfinite(array)):
            raise ConfigError(str(params_path), f"array {key!r} contains non-finite values")
        arrays[key] = array.astype(np.float32)
    return spec, arrays


def _reject_pre_time_inputs(where: str, document: dict[str, Any], options: dict[str, Any]) -> None:
    """A ta_lpo export written before ``time_inputs`` existed (24 features, log N counted PPO updates) cannot be
    read faithfully: log N is now log(env steps). One ConfigError line saying so."""
    if (
        document.get("name") == "ta_lpo"
        and "time_inputs" not in options
        and document.get("params", {}).get("hidden", [None])[0] == 24
    ):
        raise ConfigError(
            where,
            "a 24-feature ta_lpo export from before time_inputs (its log N counted PPO updates, now env steps); "
            "meta-train it again (time_inputs: fraction_and_log_horizon for the 24-feature variant)",
        )


def load_drift(directory: str | os.PathLike[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``(drift_fn, params)`` in JAX, as :func:`~metaopt.objectives.drifts.make_drift` gives."""
    import jax.numpy as jnp

    spec, arrays = read_drift(directory)
    return spec.drift_fn(), {key: jnp.asarray(array) for key, array in arrays.items()}


def load_torch_drift(directory: str | os.PathLike[str], trainable: bool = False) -> Any:
    """The exported drift as a :class:`TorchDrift` module (weights as buffers, or as
    parameters with ``trainable=True``)."""
    spec, arrays = read_drift(directory)
    return _torch_drift_class()(spec.name, spec.as_dict(), arrays, trainable=trainable)


# ---------------------------------------------------------------------------
# Torch.
# ---------------------------------------------------------------------------


@functools.cache
def _torch_drift_class() -> type:
    """Define :class:`TorchDrift` on first use, so importing this module stays torch-free."""
    import torch

    class TorchDrift(torch.nn.Module):
        """A drift in torch: ``forward(ratio, advantage, fraction=None, log_horizon=None)``.

        Same formulas and feature order as :mod:`metaopt.objectives.drifts` (PPO clipping,
        DPO, LPO, TA-LPO); float32; returns a penalty of the ratio's shape, >= 0 and 0 at
        ``ratio == 1``. Differentiable w.r.t. ``ratio`` (and ``advantage``). The network
        weights ``hidden`` ``[F, H]`` and ``out`` ``[H, 1]`` are buffers (they move with
        ``.to(device)`` and are saved in ``state_dict`` but are not optimised by a PPO
        optimizer built from ``module.parameters()``) unless ``trainable=True``.
        ``fraction`` (n/N) is required by ``ta_lpo``, ``log_horizon`` (log N) too with
        ``time_inputs="fraction_and_log_horizon"``; the other drifts ignore both.
        """

        def __init__(
            self,
            name: str,
            options: Mapping[str, Any] | None = None,
            params: Mapping[str, Any] | None = None,
            trainable: bool = False,
        ):
            super().__init__()
            spec = DriftSpec.create(name, **dict(options or {}))
            arrays = _numpy_params(spec, params)
            self.name = spec.name
            self.options = spec.as_dict()
            for key, array in arrays.items():
                tensor = torch.from_numpy(np.array(array, dtype=np.float32))
                if trainable:
                    self.register_parameter(key, torch.nn.Parameter(tensor))
                else:
                    self.register_buffer(key, tensor)

        def extra_repr(self) -> str:
            options = ", ".join(f"{key}={value}" for key, value in self.options.items())
            return f"name={self.name!r}, {options}"

        @staticmethod
        def _float32(value: Any, like: Any = None) -> Any:
            if isinstance(value, torch.Tensor):
                return value.to(torch.float32)
            device = like.device if like is not None else None
            return torch.as_tensor(value, dtype=torch.float32, device=device)

        def _ppo(self, ratio: Any, advantage: Any) -> Any:
            eps = self.options["clip_eps"]
            clipped = torch.clamp(ratio, 1.0 - eps, 1.0 + eps)
            return torch.relu((ratio - clipped) * advantage)

        def _dpo(self, ratio: Any, advantage: Any) -> Any:
            alpha, beta = self.options["alpha"], self.options["beta"]
            positive = (ratio - 1.0) * advantage
            negative = torch.log(torch.clamp(ratio, min=MIN_RATIO)) * advantage
            drift_pos = torch.relu(positive - alpha * torch.tanh(positive / alpha))
            drift_neg = torch.relu(negative - beta * torch.tanh(negative / beta))
            return torch.where(advantage >= 0.0, drift_pos, drift_neg)

        @staticmethod
        def _lpo_features(ratio: Any, advantage: Any) -> Any:
            ratio, advantage = torch.broadcast_tensors(ratio, advantage)
            delta = ratio - 1.0
            log_r = torch.log(torch.clamp(ratio, min=MIN_RATIO))
            base = [delta, delta * delta, log_r, log_r * log_r]
            return torch.stack(base + [advantage * x for x in base], dim=-1)

        def forward(self, ratio: Any, advantage: Any, fraction: Any = None, log_horizon: Any = None) -> Any:
            ratio = self._float32(ratio)
            advantage = self._float32(advantage, like=ratio)
            if self.name == "ppo":
                return self._ppo(ratio, advantage)
            if self.name == "dpo":
                return self._dpo(ratio, advantage)
            features = self._lpo_features(ratio, advantage)
            if self.name == "ta_lpo":
                with_log_horizon = self.options["time_inputs"] == "fraction_and_log_horizon"
                if fraction is None or (with_log_horizon and log_horizon is None):
                    needs = "fraction (n/N) and log_horizon (log N)" if with_log_horizon else "fraction (n/N)"
                    raise ValueError(
                        f"ta_lpo: forward needs {needs}; got fraction={fraction!r}, log_horizon={log_horizon!r}"
                    )
                blocks = [features, self._float32(fraction, like=ratio)[..., None] * features]
                if with_log_horizon:
                    blocks.append(self._float32(log_horizon, like=ratio)[..., None] * features)
                features = torch.cat(blocks, dim=-1)
            net = (torch.tanh(features @ self.hidden) @ self.out)[..., 0]
            return torch.relu(net + self._ppo(ratio, advantage) - LPO_OFFSET)

    TorchDrift.__module__ = __name__
    TorchDrift.__qualname__ = "TorchDrift"  # pickle finds it through the module __getattr__
    return TorchDrift


def __getattr__(name: str) -> Any:
    if name == "TorchDrift":
        return _torch_drift_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
