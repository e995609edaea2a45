"""Federated clients: local training on a client's own shard, in-process or as a Ray actor.

A client receives the global model (a flat parameter vector), trains ``epochs`` local epochs with its own
learning rate and optimizer (SGD or Adam), and returns its update Δ_i = local model − global model with its
sample count (McMahan et al. 2017, FedAvg). With FedHyper-CL (Wang et al. ICLR 2024, client side) the local
lr is adapted per batch by a hypergradient rule passed in as ``lr_rule``; the lrs actually used come back
with the update so the server can log them.

The server loop (:mod:`metaopt.federated.rounds`) sees its clients as a *pool* (the :class:`Clients` interface:
train these clients this round, by this deadline -> their updates, and who was left out and why), like
post-training's roles: :class:`InProcessClients` runs :class:`Client` objects in this process, :class:`RayClients`
(and :class:`ClientPool`, which also starts the actors) runs them as Ray actors. Everything Ray -- object refs,
the deadline, cancelling, actor deaths and restarts -- is handled here, never in the loop.

A round has one deadline: the Ray pool cancels the round task of a client that has not answered by then. Ray
cannot interrupt a running task of a (non-async) actor; it only raises a flag, so a client on Ray checks it
between batches and stops with :class:`RoundCancelled`. The actor is then free for the next round's request at
once, instead of training on for a round whose answer nobody will read.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from metaopt import user_code
from metaopt.config import quote
from metaopt.errors import ConfigError
from metaopt.federated.data import ClientShard, Dataset
from metaopt.federated.names import CLIENT_OPTIMIZERS, MODEL_FACTORY_PARAMS

#: lr_rule(beta_prev, u_k, u_prev, step) -> beta_k: a per-batch multiplier of the local lr (FedHyper-CL).
LrRule = Callable[[float, torch.Tensor, torch.Tensor | None, int], float]

log = logging.getLogger("metaopt.federated")


class RoundCancelled(Exception):
    """The server gave up on this round's answer (its deadline passed) and cancelled the round task."""


def ray_cancel_check() -> Callable[[], bool] | None:
    """In a Ray actor task: a function saying whether the server has ``ray.cancel``-ed it (looked up once per
    round, asked once per batch); None outside a Ray worker, where nothing can cancel the call."""
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    try:
        context.is_canceled()
    except RuntimeError:  # the driver, or an async actor: nothing to check
        return None
    return context.is_canceled


def build_model(
    input_shape: int | Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (64,),
    model: str = "mlp",
    *,
    base: str | None = None,
) -> nn.Module:
    """The clients' and the server's model for samples of ``input_shape`` (a width, or a sample's shape):
    ``mlp`` (:func:`mlp`), ``cnn`` (:func:`small_cnn`) or the researcher's ``module:function`` factory, called as
    ``make_model(input_shape, num_classes)`` and returning a ``torch.nn.Module``. Only the parameters are
    federated (averaged by the server); buffers such as BatchNorm statistics stay each client's own. A factory is
    imported from ``base`` (default :func:`metaopt.user_code.user_dir`)."""
    shape = (int(input_shape),) if isinstance(input_shape, int) else tuple(int(d) for d in input_shape)
    if model == "mlp":
        return mlp(math.prod(shape), num_classes, hidden)
    if model == "cnn":
        return small_cnn(shape, num_classes, hidden)
    make_model = user_code.load_callable(model, MODEL_FACTORY_PARAMS, base=base)
    net = user_code.call(make_model, model, shape, num_classes)
    return user_code.expect(net, model, nn.Module, "a torch.nn.Module")


def mlp(in_features: int, num_classes: int, hidden: Sequence[int] = (64,)) -> nn.Module:
    """The tasks' MLP (:func:`metaopt.tasks.digits.build_mlp`) behind a Flatten, so images work too."""
    from metaopt.tasks.digits import build_mlp

    return nn.Sequential(nn.Flatten(), *build_mlp(in_features, tuple(hidden), num_classes))


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """[C, H, W] of a sample: as given, [H, W] with one channel, or a flat d = s^2 vector read as a 1 x s x s
    image (digits' 64 features, Fashion-MNIST's 784); anything else is one error line on ``model``."""
    if len(input_shape) == 3:
        return input_shape  # type: ignore[return-value]
    if len(input_shape) == 2:
        return (1, *input_shape)  # type: ignore[return-value]
    side = math.isqrt(input_shape[0]) if len(input_shape) == 1 else 0
    if side and side * side == input_shape[0]:
        return (1, side, side)
    raise ConfigError(
        "model", f"cnn needs images [C, H, W] (or a square number of features); samples are {input_shape}"
    )


def small_cnn(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (512,)) -> nn.Module:
    """The small CNN of McMahan et al. 2017 (FedAvg, Sec. 3; FedHyper, Wang et al. ICLR 2024, uses it for its
    image tasks): two 5x5 convolutions with 32 and 64 channels, each followed by ReLU and 2x2 max pooling, then
    dense ReLU layers of widths ``hidden`` (the paper: one of 512) and the class logits. 'Same' padding, so any
    image of 4 x 4 pixels or more fits."""
    channels, height, width = image_shape(input_shape)
    if min(height, width) < 4:
        raise ConfigError("model", f"cnn needs images of 4 x 4 pixels or more (two 2x2 poolings); got {height}x{width}")
    from metaopt.tasks.digits import build_mlp

    return nn.Sequential(
        nn.Unflatten(1, (channels, height, width)) if len(input_shape) != 3 else nn.Identity(),
        nn.Conv2d(channels, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        *build_mlp(64 * (height // 4) * (width // 4), tuple(hidden), num_classes),
    )


def check_model(model: str, data: Dataset, hidden: Sequence[int] = (64,), *, base: str | None = None) -> None:
    """Build ``model`` for ``data`` and run it on two samples: it must have parameters to federate and answer
    [2, num_classes] logits. Called before Ray starts, so a wrong factory is one error line, not failed trials."""
    net = build_model(data.sample_shape, data.num_classes, hidden, model, base=base)
    if not any(p.requires_grad for p in net.parameters()):
        raise ConfigError("model", f"{quote(model)} has no trainable parameters to federate")
    net.eval()
    try:
        with torch.no_grad():
            logits = net(data.x[:2])
    except Exception as err:
        problem = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ConfigError(
            "model",
            f"{quote(model)} failed on a batch of 2 samples of shape {list(data.sample_shape)}: {type(err).__name__}: "
            f"{problem}",
        ) from None
    expected = (2, data.num_classes)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(
            "model",
            f"{quote(model)} returned {got} for a batch of 2 samples; expected [batch, num_classes] = {expected}",
        )


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def set_flat_params(model: nn.Module, vector: torch.Tensor) -> None:
    # vector_to_parameters makes the parameters *views* of the vector: copy, or training would write into it.
    torch.nn.utils.vector_to_parameters(vector.detach().clone(), model.parameters())


@dataclass
class LocalResult:
    delta: torch.Tensor
    num_samples: int
    local_lr: float  # the lr the client started the round with
    lrs_used: list[float] = field(default_factory=list)  # per batch (differs from local_lr under CL)
    train_loss: float = 0.0
    client_id: int = -1


def local_train(
    model: nn.Module,
    global_params: torch.Tensor,
    shard: ClientShard,
    *,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    batch_size: int = 32,
    seed: int = 0,
    lr_rule: LrRule | None = None,
    should_stop: Callable[[], bool] | None = None,
    momentum: float = 0.0,
) -> LocalResult:
    """Local epochs from the global model; returns Δ = local − global and the lrs used per batch.
    SGD takes ``momentum`` (the FedHyper authors' clients use 0.5; buffers start at 0 each round).
    Under ``lr_rule`` (FedHyper-CL) u_k is batch k's whole parameter change, and (u_{k−1}, β_{k−1})
    carry across the round's local epochs (u_0 None: the rule uses Δ_{t−1}, see ``cl_beta``).
    ``should_stop()`` is asked before every batch; when it says yes, :class:`RoundCancelled` is raised."""
    if optimizer not in CLIENT_OPTIMIZERS:
        raise ConfigError(
            "client_optimizer", f"unknown optimizer {optimizer!r}; allowed: {', '.join(CLIENT_OPTIMIZERS)}"
        )
    set_flat_params(model, global_params)
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    generator = torch.Generator().manual_seed(seed)
    lrs, losses, beta, previous_step = [], [], 1.0, None
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(shard.num_train, generator=generator)
        for start in range(0, shard.num_train, batch_size):
            if should_stop is not None and should_stop():
                raise RoundCancelled(f"cancelled after {step} batches")
            idx = order[start : start + batch_size]
            before = flat_params(model) if lr_rule else None
            for group in opt.param_groups:
                group["lr"] = lr * beta
            loss = nn.functional.cross_entropy(model(shard.train_x[idx]), shard.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lrs.append(lr * beta)
            losses.append(loss.item())
            if lr_rule is not None:
                change = flat_params(model) - before  # u_k: this batch's parameter change
                beta = lr_rule(beta, change, previous_step, step)
                previous_step = change
            step += 1
    delta = flat_params(model) - global_params
    return LocalResult(delta, shard.num_train, lr, lrs, sum(losses) / max(len(losses), 1))


def to_wire(vector: torch.Tensor) -> np.ndarray:
    """A parameter vector (the global model, a client's delta) as it crosses a Ray call: float32 numpy."""
    return vector.detach().to("cpu", torch.float32).numpy()


def tensor_from_wire(array: np.ndarray) -> torch.Tensor:
    """:func:`to_wire` undone: a writable torch copy (arrays Ray hands back may be read-only)."""
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def pack_round_request(global_params: torch.Tensor, settings: dict[str, Any]) -> bytes:
    """One round's request to every client -- the global model as float32 numpy and the round's settings
    (lr, epochs, FedHyper-CL's rule) -- pickled *once per round*. Ray passes ``bytes`` through without pickling
    them again, so ten clients cost one serialisation instead of ten; on 2 cores with 10 client actors that made
    rounds a little faster than passing the array and the settings as call arguments (``benchmarks/fed_rounds.py``
    measures rounds; the figures are in ``benchmarks/results.csv``). cloudpickle, because a CL rule is a partial
    over the strategy."""
    from ray import cloudpickle

    return cloudpickle.dumps((to_wire(global_params), settings), protocol=5)


def unpack_round_result(payload: bytes) -> LocalResult:
    """A :meth:`Client.train_round` answer back as a :class:`LocalResult` with a torch delta."""
    result = pickle.loads(payload)
    result.delta = tensor_from_wire(result.delta)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    set_flat_params(model, params)
    model.eval()
    logits = model(x)
    return {
        "loss": nn.functional.cross_entropy(logits, y).item(),
        "accuracy": (logits.argmax(-1) == y).float().mean().item(),
    }


class Client:
    """One client's shard and model; ``train`` is what a round asks of it. Wrapped as a Ray actor by
    :func:`client_actor_class`; usable directly in a process for tests and debugging."""

    def __init__(
        self,
        client_id: int,
        shard: ClientShard,
        input_shape: int | Sequence[int],
        num_classes: int,
        hidden: tuple[int, ...] = (64,),
        model: str = "mlp",
    ):
        torch.set_num_threads(1)
        self.client_id = client_id
        # The GPU Ray gave this actor (gpus_per_client > 0 on a GPU cluster), else the CPU.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.shard = ClientShard(*(t.to(self.device) for t in (shard.train_x, shard.train_y, shard.val_x, shard.val_y)))
        self.model = build_model(input_shape, num_classes, hidden, model).to(self.device)

    def train(
        self,
        global_params: torch.Tensor,
        *,
        round_index: int,
        epochs: int,
        lr: float,
        optimizer: str = "sgd",
        batch_size: int = 32,
        lr_rule: LrRule | None = None,
        should_stop: Callable[[], bool] | None = None,
        momentum: float = 0.0,
    ) -> LocalResult:
        seed = 1_000_003 * round_index + self.client_id  # different batches per round and client, reproducible
        result = local_train(
            self.model,
            global_params.to(self.device),
            self.shard,
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            batch_size=batch_size,
            seed=seed,
            lr_rule=lr_rule,
            should_stop=should_stop,
            momentum=momentum,
        )
        result.delta = result.delta.cpu()
        result.client_id = self.client_id
        return result

    def train_round(self, request: bytes) -> bytes | None:
        """:meth:`train` as a Ray call: a :func:`pack_round_request` in, the pickled :class:`LocalResult`
        (delta as float32 numpy) out, read back by :func:`unpack_round_result`. Plain bytes both ways: numpy
        skips the ``torch.save`` round trip a pickled tensor takes, and Ray does not pickle bytes again.
        Stops between batches once the server has cancelled it (:func:`ray_cancel_check`) and returns None:
        nobody reads that answer, and an exception would be logged by Ray as an unhandled error."""
        global_params, settings = pickle.loads(request)
        try:
            result = self.train(tensor_from_wire(global_params), **settings, should_stop=ray_cancel_check())
        except RoundCancelled:
            return None
        result.delta = to_wire(result.delta)
        return pickle.dumps(result, protocol=5)

    def validate(self, params: torch.Tensor) -> dict[str, float]:
        metrics = evaluate(self.model, params.to(self.device), self.shard.val_x, self.shard.val_y)
        return {**metrics, "samples": len(self.shard.val_y)}

    def pid(self) -> int:
        import os

        return os.getpid()


@dataclass(frozen=True)
class RoundAnswers:
    """What a pool brings back from one round: the updates of the clients that answered (in the order they were
    asked) and, for each client left out, why (``late``, ``failed (RayActorError)``, ``down``)."""

    results: list[LocalResult]
    left_out: dict[int, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[int]:
        return sorted(self.left_out)


class Clients(Protocol):
    """The clients as the server loop sees them (:class:`metaopt.federated.rounds.FederatedRun`)."""

    def __len__(self) -> int:
        """How many clients there are (ids 0 .. len - 1)."""

    def train_round(
        self,
        chosen: list[int],
        global_params: torch.Tensor,
        settings: dict[str, Any],
        *,
        timeout_s: float,
        restart_wait_s: float,
    ) -> RoundAnswers:
        """Train ``chosen`` from ``global_params`` with ``settings`` (:meth:`Client.train`'s keywords, including
        ``round_index``); a client that has not answered ``timeout_s`` after the round started, or cannot be
        reached (waiting up to ``restart_wait_s`` for one being restarted), is left out with its reason."""


class InProcessClients:
    """:class:`Client` objects trained one after the other in this process: nothing can die or be late (the
    deadline is not enforced), so every chosen client answers. For tests, debugging and benchmarks of the
    algorithms; what it trains is what :class:`RayClients` trains."""

    def __init__(self, clients: list[Client]):
        self.clients = clients

    def __len__(self) -> int:
        return len(self.clients)

    def train_round(
        self,
        chosen: list[int],
        global_params: torch.Tensor,
        settings: dict[str, Any],
        *,
        timeout_s: float,
        restart_wait_s: float,
    ) -> RoundAnswers:
        return RoundAnswers([self.clients[i].train(global_params, **settings) for i in chosen])


def wait_round(futures: dict[int, Any], timeout_s: float) -> tuple[dict[int, Any], list[int]]:
    """``(answered, late)``: one ``ray.wait`` over every client's round task with the round's deadline (not a
    timeout per client in turn, which would let k slow clients stretch a round to k deadlines). The late
    clients' tasks are cancelled: ``force=False``, the only kind Ray allows for actor tasks -- a queued task is
    dropped, a running one sees the flag (:func:`ray_cancel_check`)."""
    import ray

    if not futures:
        return {}, []
    ready, _ = ray.wait(list(futures.values()), num_returns=len(futures), timeout=timeout_s)
    ready = set(ready)
    late = [i for i, ref in futures.items() if ref not in ready]
    for i in late:
        ray.cancel(futures[i], force=False)
    return {i: ref for i, ref in futures.items() if ref in ready}, late


class RayClients:
    """Client actors (handles of :func:`client_actor_class` actors, or anything with the same methods) as a pool.

    A round collects Δ_i from every client that answers by the round's one deadline; a client whose actor died
    mid-round is left out (the round completes with the others) and Ray restarts the actor, with its shard, for
    later rounds -- the next round first waits up to ``restart_wait_s`` for it to answer again; a client that is
    merely late is left out the same way and its round task cancelled (the client stops at its next batch, so
    its next round is not stuck behind the stale one; results travel by each round's own object refs, so a
    stale answer can never be read as a later round's).
    """

    def __init__(self, actors: list[Any]):
        self.actors = actors
        self.recovering: set[int] = set()  # clients that failed and that Ray is restarting

    def __len__(self) -> int:
        return len(self.actors)

    def train_round(
        self,
        chosen: list[int],
        global_params: torch.Tensor,
        settings: dict[str, Any],
        *,
        timeout_s: float,
        restart_wait_s: float,
    ) -> RoundAnswers:
        import ray

        round_number = int(settings["round_index"]) + 1
        left_out = {
            i: "down" for i in chosen if i in self.recovering and not self._back(i, restart_wait_s, round_number)
        }
        # The model travels as a numpy vector (a pickled tensor goes through torch.save / torch.load on both ends),
        # inline in each call rather than through ray.put, and packed once for all clients: on 2 cores with 10
        # client actors each of these made rounds faster (benchmarks/fed_rounds.py measures rounds; the probes'
        # figures are in benchmarks/results.csv, the latest ratio in benchmarks/README.md).
        request = pack_round_request(global_params, settings)
        futures = {i: self.actors[i].train_round.remote(request) for i in chosen if i not in left_out}
        answered, late = wait_round(futures, timeout_s)
        for i in late:  # alive but slow: not "recovering" (asking it for its pid would queue behind the round)
            left_out[i] = "late"
            log.warning(
                "round %d: client %d did not answer within the round's %gs; left out, its task cancelled",
                round_number,
                i,
                timeout_s,
            )
        results = []
        for i, future in answered.items():
            try:
                results.append(unpack_round_result(ray.get(future)))
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                left_out[i] = f"failed ({type(err).__name__})"
                self.recovering.add(i)
                log.warning(
                    "round %d: client %d failed (%s); the round goes on with the others",
                    round_number,
                    i,
                    type(err).__name__,
                )
        return RoundAnswers(results, left_out)

    def _back(self, client: int, restart_wait_s: float, round_number: int) -> bool:
        """Has Ray restarted this client's actor? Waits up to ``restart_wait_s`` for it to answer."""
        import ray

        deadline = time.monotonic() + restart_wait_s
        while True:
            try:
                ray.get(self.actors[client].pid.remote(), timeout=max(0.1, deadline - time.monotonic()))
                break
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again until the deadline
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            log.warning("round %d: client %d is still down; left out of this round", round_number, client)
            return False
        self.recovering.discard(client)
        log.warning("round %d: client %d is back (restarted by Ray)", round_number, client)
        return True


def client_actor_class(max_restarts: int = 3, cpus: float = 0.5, gpus: float = 0.0) -> Any:
    """:class:`Client` as a Ray actor that Ray restarts (with its shard) after its process dies."""
    import ray

    return ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts, max_task_retries=0)(Client)


class ClientPool(RayClients):
    """One Ray actor per client, as a :class:`RayClients` pool. The shards live in the object store under
    references this pool holds, so a client actor that Ray restarts after its process died gets its shard back
    (restarts re-run the constructor with the same arguments)."""

    def __init__(
        self,
        shards: list[ClientShard],
        input_shape: int | Sequence[int],
        num_classes: int,
        hidden: tuple[int, ...] = (64,),
        max_restarts: int = 3,
        cpus: float = 0.5,
        gpus: float = 0.0,
        model: str = "mlp",
    ):
        import ray

        actor = client_actor_class(max_restarts, cpus, gpus)
        self.shard_refs = [ray.put(shard) for shard in shards]
        super().__init__(
            [actor.remote(i, ref, input_shape, num_classes, hidden, model) for i, ref in enumerate(self.shard_refs)]
        )

    def close(self) -> None:
        """Kill the client actors and drop every handle to them now: a handle left for the garbage collector may
        be collected while Tune's SIGTERM stops the trial's process, which prints a traceback from
        ``ActorHandle.__del__``."""
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors.clear()
        self.shard_refs.clear()
