"""The ``federated:`` section: federated trainings as Tune trials, strategies x initial lrs x seeds.

Each trial is one federated training (Wang et al. ICLR 2024, FedHyper, and its baselines) with its clients as
Ray actors; one Tune iteration is one round. Loading a section imports neither torch nor Ray; only where the
experiment runs here (validation context ``check_paths``) is the researcher's own data and model loaded and
checked once (:meth:`FederatedSection._check_data_and_model`), so a bad one is one error line before Ray starts.

The researcher's own problem (issue 22):

- ``dataset``: a built-in name (:data:`metaopt.federated.names.DATASETS`); a ``module:function`` reference to
  ``make_data()`` returning ``(x, y)`` or ``(x, y, groups)`` (numpy arrays or torch tensors) or a
  :class:`metaopt.federated.data.Dataset`; a ``.npz`` file with arrays ``x``, ``y`` (and ``groups``:
  :attr:`FederatedSection.group_column`); a ``.csv`` file with a label column (``label_column``), numeric feature
  columns and optionally a group column; or a folder of images, one subfolder per class (``image_size``,
  ``image_mode``).
- ``model``: ``mlp`` (``hidden``), ``cnn`` (McMahan et al. 2017's small CNN) or a ``module:function`` reference
  to ``make_model(input_shape, num_classes) -> torch.nn.Module``.
- ``partition``: ``iid``, ``dirichlet`` or ``natural`` (each client holds whole groups: writers, users).

The server strategies' options are here too, one model per strategy chosen by ``name`` (:data:`STRATEGY_OPTIONS`,
the one list of strategy names): the section validates its ``strategies`` against it, and
:func:`metaopt.federated.strategies.make_strategy` builds a strategy from a validated model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from metaopt import user_code
from metaopt.config import Seed, StrictModel, absolute_path, is_dir, is_file, quote, quote_path, validation_base
from metaopt.errors import ConfigError
from metaopt.federated.names import (  # the one list of each kind of name
    MODEL_FACTORY_PARAMS,
    MODELS,
    ClientOptimizerName,
    PartitionName,
    dataset_kind,
    unknown_dataset,
)
from metaopt.optim.specs import LearningRate, NamedSpec, NamedSpecs, Number, literal_name
from metaopt.registry import Capability

# ------------------------------------------------------------------------------------ server strategies


def _ordered(pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError("must be a pair [low, high] with low <= high")
    return pair


#: ``[low, high]`` with low <= high.
Bounds = Annotated[tuple[Number, Number], AfterValidator(_ordered)]


class StrategyOptions(NamedSpec):
    """What every server strategy takes: the base client lr."""

    model_config = ConfigDict(frozen=True)

    lr0: LearningRate | None = Field(
        default=None, description="Base client lr (None: the first round's mean local_lr)."
    )


#: How Delta_t is formed from the participating clients' deltas: ``mean`` (unweighted, Reddi et al. 2021 Alg. 2 and
#: the FedHyper authors' code) or ``weighted`` by sample counts n_i / sum n_j (McMahan et al. 2017's FedAvg).
AggregationName = Literal["mean", "weighted"]


class AggregatedOptions(StrategyOptions):
    """A strategy that steps along Delta_t, the aggregate of the clients' deltas."""

    aggregation: AggregationName = Field(
        default="mean",
        description="Delta_t = unweighted mean of the clients' deltas (mean: Reddi et al. 2021 Alg. 2, FedHyper's "
        "code) or weighted by sample counts (weighted: McMahan et al. 2017's FedAvg).",
    )


class FedAvgOptions(AggregatedOptions):
    """FedAvg with a server lr (McMahan et al. 2017; Reddi et al. 2021, Alg. 1 with an SGD server)."""

    name: Literal["fedavg"] = "fedavg"
    server_lr: LearningRate = Field(default=1.0, description="eta_g in x_{t+1} = x_t + eta_g Delta_t.")


class FedOptOptions(AggregatedOptions):
    """FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2); the name picks the second moment."""

    server_lr: LearningRate = Field(default=1e-2, description="eta, the server's step size.")
    beta1: Number = Field(default=0.9, ge=0, lt=1, description="First-moment decay.")
    beta2: Number = Field(default=0.99, ge=0, lt=1, description="Second-moment decay (FedAdam, FedYogi).")
    tau: Number = Field(default=1e-3, gt=0, description="Adaptivity: the denominator's offset.")
    initial_v: Number | None = Field(default=None, ge=0, description="v_{-1} (None: tau^2, the paper's minimum).")

    @property
    def variant(self) -> str:
        """``adagrad``, ``adam`` or ``yogi``: the name without its ``fed``."""
        return self.name.removeprefix("fed")


class FedAdamOptions(FedOptOptions):
    name: Literal["fedadam"] = "fedadam"


class FedAdagradOptions(FedOptOptions):
    name: Literal["fedadagrad"] = "fedadagrad"


class FedYogiOptions(FedOptOptions):
    name: Literal["fedyogi"] = "fedyogi"


class FedExpOptions(StrategyOptions):
    """FedExP (Jhunjhunwala, Wang, Joshi, ICLR 2023, eq. 9)."""

    name: Literal["fedexp"] = "fedexp"
    eps: Number = Field(default=0.0, ge=0, description="epsilon guarding ||mean delta|| = 0 in eta_g's denominator.")
    average_last_two: bool = Field(
        default=True,
        description="Evaluate (x_t + x_{t+1}) / 2, the paper's average of the last two iterates (training goes on "
        "from x_{t+1}).",
    )


class FedHyperBase(AggregatedOptions):
    """FedHyper (Wang, Wang, Li, ICLR 2024): the constants of its schedulers; ``server`` and ``client_lr`` pick
    which ones run (free in :class:`FedHyperOptions`, fixed by the name in the presets)."""

    alpha_bounds: Bounds | None = Field(
        default=None, description="Clip of the server offset a (None: the paper's bounds for the server rule)."
    )
    momentum: Number = Field(default=0.9, ge=0, lt=1, description="mu of the server-global momentum rule (gm).")
    sl_bounds: Bounds = Field(default=(0.001, 0.1), description="Clip of the server-local client lr (sl).")
    decay_gamma: Number = Field(default=0.995, gt=0, le=1, description="gamma of the decay baseline: lr0 gamma^t.")
    num_clients_total: int = Field(default=1, ge=1, description="N of the client-local rule (cl).")
    fraction: Number = Field(default=1.0, gt=0, le=1, description="C, share of clients per round (cl).")
    cl_gamma_max: Number = Field(default=1.1, gt=0, description="Cap of the client-local factor gamma_k (cl).")
    cl_global_scale: Number = Field(default=0.1, ge=0, description="Weight of <u_k, Delta_{t-1}> in gamma_k (cl).")
    cl_bounds: Bounds = Field(default=(0.1, 10.0), description="Clip of the client-local beta_k (cl).")

    def rules(self) -> tuple[str, str]:
        """(server rule, client-lr rule): a preset's, fixed by its name (:data:`FEDHYPER_PRESETS`)."""
        return FEDHYPER_PRESETS[self.name]


class FedHyperOptions(FedHyperBase):
    """FedHyper with free flags: any server rule with any client-lr rule."""

    name: Literal["fedhyper"] = "fedhyper"
    server: Literal["avg", "g", "gm"] = Field(default="g", description="avg, server-global (g) or with momentum (gm).")
    client_lr: Literal["fixed", "sl", "cl", "decay"] = Field(
        default="fixed", description="fixed lr0, server-local (sl), client-local (cl) or exponential decay."
    )

    def rules(self) -> tuple[str, str]:
        return self.server, self.client_lr


#: FedHyper presets: name -> (server rule, client-lr rule), the combinations of Wang, Wang, Li 2024's tables.
FEDHYPER_PRESETS: dict[str, tuple[str, str]] = {
    "decay": ("avg", "decay"),
    "fedhyper_g": ("g", "fixed"),
    "fedhyper_gm": ("gm", "fixed"),
    "fedhyper_sl": ("avg", "sl"),
    "fedhyper_cl": ("avg", "cl"),
    "fedhyper_g_cl": ("g", "cl"),
    "fedhyper_full": ("gm", "cl"),  # the paper's full FedHyper: server-global with momentum + client-local
    "decay_g": ("g", "decay"),  # the paper's Decay-G: server-global + exponentially decayed client lr
}


def _fedhyper_preset(name: str) -> type[FedHyperBase]:
    """The options model of one preset: FedHyper's constants; its two rules are fixed by the name, not options."""
    server, client_lr = FEDHYPER_PRESETS[name]
    return create_model(
        f"FedHyperPreset_{name}",
        __base__=FedHyperBase,
        __doc__=f"FedHyper, server {server}, client lr {client_lr}.",
        name=(Literal[name], name),  # type: ignore[arg-type]  # a Literal of a runtime value
    )


#: The server strategies: name -> options model. The one list of strategy names.
STRATEGY_OPTIONS: NamedSpecs[StrategyOptions] = NamedSpecs("strategy")
for _model in (FedAvgOptions, FedAdamOptions, FedAdagradOptions, FedYogiOptions, FedExpOptions):
    STRATEGY_OPTIONS.register(literal_name(_model), _model)
for _name in FEDHYPER_PRESETS:
    STRATEGY_OPTIONS.register(_name, _fedhyper_preset(_name))
STRATEGY_OPTIONS.register("fedhyper", FedHyperOptions)
STRATEGY_NAMES = STRATEGY_OPTIONS.names()


class FederatedSection(StrictModel):
    """Federated learning with adaptive server/client learning rates; clients are Ray actors."""

    dataset: str = Field(
        default="digits",
        description="digits, synthetic, fashion_mnist, cifar10; 'module:function' -> (x, y) | (x, y, groups) | "
        "Dataset; a .npz (arrays x, y), a .csv (label column + numeric features) or a folder of images (a "
        "subfolder per class).",
    )
    data_root: str | None = Field(default=None, description="Directory of fashion_mnist / cifar10 files.")
    label_column: str = Field(default="label", min_length=1, description="The .csv file's label column.")
    group_column: str = Field(
        default="groups",
        min_length=1,
        description="The .csv column / .npz array of group ids (writer, user) for partition natural; optional.",
    )
    image_size: int = Field(default=32, ge=4, le=1024, description="Images are resized to image_size^2 pixels.")
    image_mode: Literal["RGB", "L"] = Field(default="RGB", description="Pillow mode images are read in: 3 or 1 ch.")
    model: str = Field(
        default="mlp",
        description="mlp (hidden), cnn (McMahan et al. 2017) or 'module:function' -> make_model(input_shape, "
        "num_classes) returning a torch.nn.Module.",
    )
    num_clients: int = Field(default=10, ge=1, description="Clients (each a Ray actor with its own shard).")
    partition: PartitionName = Field(
        default="dirichlet", description="iid, dirichlet (label skew) or natural (whole groups per client)."
    )
    alpha: float = Field(default=0.5, description="Dirichlet concentration of the label skew (> 0).")
    fraction: float = Field(default=1.0, description="C: share of clients sampled per round, in (0, 1].")
    rounds: int = Field(default=30, ge=1, description="Federated rounds = Tune iterations.")
    local_epochs: int = Field(default=1, ge=1, description="E: local epochs per round.")
    client_optimizer: ClientOptimizerName = Field(default="sgd")
    client_momentum: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Momentum of the clients' local SGD (0: plain SGD; the FedHyper authors' code uses 0.5).",
    )
    aggregation: AggregationName = Field(
        default="mean",
        description="Delta_t of fedavg, fedadam/adagrad/yogi and fedhyper*: the unweighted mean of the clients' "
        "deltas (mean, as Reddi et al. 2021 and FedHyper's code) or weighted by samples (weighted, McMahan et al.).",
    )
    batch_size: int = Field(default=32, ge=1)
    hidden: list[int] = Field(
        default_factory=lambda: [64], description="Hidden widths of the MLP, and of the CNN's dense layers."
    )
    val_fraction: float = Field(default=0.2, gt=0, lt=1, description="Share of each client's data for validation.")
    strategies: list[str] = Field(default_factory=lambda: ["fedavg", "fedhyper_g"], min_length=1)
    lrs: list[float] = Field(default_factory=lambda: [0.05], min_length=1, description="Initial local lrs swept.")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    cpus_per_client: float = Field(default=0.1, gt=0, description="CPUs each client actor reserves.")
    gpus_per_client: float = Field(default=0.0, ge=0, description="GPUs each client actor reserves.")
    scheduler: Literal["grid", "pbt"] = Field(
        default="grid", description="grid: every strategy x lr x seed; pbt: PBT also adapts the initial local lr."
    )
    pbt_interval: int = Field(default=5, ge=1, description="Rounds between PBT exploit/explore steps.")
    max_failures: int = Field(default=2, ge=0, description="Restarts of a crashed trial from its last round.")
    target_accuracy: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Accuracy whose first round each trial's row reports as rounds_to_target (the speed-up claim "
        "of Wang et al. 2024: rounds to reach a target accuracy); None: not reported.",
    )
    round_timeout_s: float = Field(
        default=600.0,
        gt=0,
        allow_inf_nan=False,
        description="One deadline per round (s): clients that have not answered by then are left out of it.",
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, dataset: str, info: ValidationInfo) -> str:
        """A built-in name, a well-formed reference (imported where it runs here), or a path made absolute
        against where the user ran (a trial runs in a folder of its own) and checked to exist there."""
        kind = dataset_kind(dataset)
        if kind == "builtin":
            return dataset
        if kind == "function":
            return _checked_reference(dataset, (), info, data_allowed=True)
        _, check_paths = validation_base(info)
        path = absolute_path(dataset, info, directory=kind == "images", what="data", check=False)
        if check_paths and kind != "images" and not is_file(Path(path)):
            raise ConfigError("", f"{quote_path(path)}: no such file")
        if check_paths and kind == "images" and not is_dir(Path(path)):
            raise ConfigError("", unknown_dataset(dataset, path))
        return path

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str, info: ValidationInfo) -> str:
        if model in MODELS:
            return model
        if not user_code.is_reference(model):
            raise ValueError(
                f"unknown model {quote(model)}; allowed: {', '.join(MODELS)}, or a 'module:function' "
                f"make_model({', '.join(MODEL_FACTORY_PARAMS)}) -> torch.nn.Module"
            )
        return _checked_reference(model, MODEL_FACTORY_PARAMS, info)

    @field_validator("data_root")
    @classmethod
    def _absolute_data_root(cls, root: str | None, info) -> str | None:
        # made absolute against where the user ran (trials run in folders of their own) and checked there
        return None if root is None else absolute_path(root, info, directory=True, what="the dataset's files")

    @field_validator("alpha")
    @classmethod
    def _positive_alpha(cls, alpha: float) -> float:
        if alpha <= 0:
            raise ValueError(f"must be > 0 (got {alpha}); small alpha = strong label skew")
        return alpha

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, fraction: float) -> float:
        if not 0 < fraction <= 1:
            raise ValueError(f"must be in (0, 1] (got {fraction})")
        return fraction

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, strategies: list[str]) -> list[str]:
        for name in strategies:
            if name not in STRATEGY_NAMES:
                raise ValueError(f"unknown strategy {quote(name)}; allowed: {', '.join(STRATEGY_NAMES)}")
        return strategies

    @field_validator("lrs")
    @classmethod
    def _positive_lrs(cls, lrs: list[float]) -> list[float]:
        if any(lr <= 0 for lr in lrs):
            raise ValueError(f"every lr must be > 0 (got {lrs})")
        return lrs

    @model_validator(mode="after")
    def _consistent(self) -> FederatedSection:
        if self.scheduler == "pbt" and self.pbt_interval >= self.rounds:
            raise ConfigError(
                "pbt_interval", f"must be < rounds so PBT perturbs at all ({self.pbt_interval} >= {self.rounds})"
            )
        if self.client_momentum > 0 and self.client_optimizer != "sgd":
            raise ConfigError("client_momentum", f"applies to client_optimizer sgd, not {self.client_optimizer}")
        if self.dataset in ("fashion_mnist", "cifar10") and not self.data_root:
            raise ConfigError("data_root", f"{self.dataset} is read from a local directory; set data_root")
        return self

    @model_validator(mode="after")
    def _check_data_and_model(self, info: ValidationInfo) -> FederatedSection:
        """Where the experiment runs here: the researcher's data loaded once and checked (types, lengths,
        labels; enough samples or groups for the clients of every seed's split), and the model built and run on
        two samples (its output must be [2, num_classes]) -- one error line before Ray starts. Built-in data with
        the built-in MLP needs none of this (:meth:`check` counts its samples)."""
        base, check_paths = validation_base(info)
        own = dataset_kind(self.dataset) != "builtin" or self.model != "mlp" or self.partition == "natural"
        if not (check_paths and own):
            return self
        from metaopt.federated.clients import check_model
        from metaopt.federated.data import make_client_shards, section_dataset

        data = section_dataset(self, seed=self.seeds[0], base=str(base))
        if self.partition == "natural" and data.groups is None:
            raise ConfigError(
                "partition",
                f"natural splits by group, and dataset {quote(self.dataset)} has none: a .npz array or .csv column "
                f"named {quote(self.group_column)} (group_column), or make_data() returning (x, y, groups)",
            )
        for seed in self.seeds:
            make_client_shards(data, self.num_clients, self.partition, self.alpha, self.val_fraction, seed=seed)
        try:
            check_model(self.model, data, tuple(self.hidden), base=str(base))
        except ConfigError as err:
            raise ConfigError(err.field or "model", err.problem) from None
        return self

    def strategy_options(self, name: str) -> dict[str, Any]:
        """The section's settings that strategy ``name`` takes: ``aggregation``, and FedHyper's N and C."""
        fields = STRATEGY_OPTIONS.model(name).model_fields
        settings = {"aggregation": self.aggregation, "num_clients_total": self.num_clients, "fraction": self.fraction}
        return {key: value for key, value in settings.items() if key in fields}

    def check(self) -> None:
        """The dataset size decides how many clients it can feed (train + validation each). Local datasets are
        checked when the run starts (a file submitted to a cluster names a path on the cluster, not here)."""
        samples = {"digits": 1797, "synthetic": 4000}.get(self.dataset)
        if samples is not None and 2 * self.num_clients > samples:
            raise ConfigError(
                "num_clients",
                f"{self.num_clients} clients need at least {2 * self.num_clients} "
                f"samples (train + validation each); {self.dataset} has {samples}",
            )


def _checked_reference(
    reference: str, params: tuple[str, ...], info: ValidationInfo, *, data_allowed: bool = False
) -> str:
    """A user's ``module:function``: well formed always; a ``pickle:`` object only from Python; importable and
    callable with ``params`` where the experiment runs here (as :func:`metaopt.user_code.user_function`).
    ``data_allowed``: the reference may name the data itself instead (the Python API's dataset in memory)."""
    problem = user_code.reference_problem(reference)
    if problem:
        raise ConfigError("", problem)
    context = info.context
    if reference.startswith(user_code.PICKLE_PREFIX) and context is not None and not context.get("python_objects"):
        raise ConfigError("", "a pickle: reference is written by metaopt's Python API; name a 'module:function'")
    if context and context.get("check_paths"):
        target = user_code.load(reference, base=context.get("base"))
        if callable(target) or not data_allowed:
            user_code.check_signature(target, reference, params)
    return reference


CAPABILITY = Capability(kind="federated", section=FederatedSection, runner="metaopt.federated.sweep:run")
