"""The three roles of GRPO post-training, as plain classes that run in-process or as Ray actors.

* :class:`RolloutWorker` samples G completions per prompt with its copy of the policy (weights arrive from the
  learner through the object store every step) and, when the reference lives with it, the reference model's
  token log-probs of those completions; it also runs the greedy evaluation.
* :class:`LearnerWorker` holds the trained policy and its optimizer: supervised warm-up, then GRPO updates.
* :class:`ReferenceWorker` holds the frozen reference policy on its own (``roles.reference: actor``).

:class:`Roles` puts the same three objects behind one calling convention, so :mod:`metaopt.posttrain.loop`
does not care whether they are local objects (``roles.mode: colocated``, for debugging) or Ray actors
(``actors``: each reserves ``cpus_per_actor`` and, on a GPU cluster, ``gpus_per_rollout`` / ``gpus_per_learner``).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metaopt.posttrain.grpo import GRPOLearner, batch_logprobs
from metaopt.posttrain.policy import get_weights, make_policy, prompt_renderer, set_weights
from metaopt.posttrain.sampling import RolloutBatch, sample_completions
from metaopt.posttrain.tasks import TaskSet, make_taskset
from metaopt.posttrain.warmup import evaluate_accuracy, supervised_warmup


@dataclass(frozen=True)
class PackedWeights:
    """A state dict as one byte buffer plus (name, dtype, shape, offset) entries: Ray moves one numpy buffer
    through the object store (zero-copy reads) instead of pickling one tensor per entry."""

    buffer: np.ndarray
    entries: tuple[tuple[str, str, tuple[int, ...], int, int], ...]


def pack_weights(weights: dict[str, torch.Tensor]) -> PackedWeights:
    entries, parts, offset = [], [], 0
    for name, tensor in weights.items():
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        entries.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, raw.numel()))
        parts.append(raw)
        offset += raw.numel()
    buffer = torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.uint8)
    return PackedWeights(buffer, tuple(entries))


def unpack_weights(packed: PackedWeights) -> dict[str, torch.Tensor]:
    """Views into the buffer (read-only when Ray hands it over zero-copy; ``load_state_dict`` copies them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = torch.from_numpy(np.asarray(packed.buffer))
    return {
        name: data[offset : offset + size].view(getattr(torch, dtype)).reshape(shape)
        for name, dtype, shape, offset, size in packed.entries
    }


def worker_taskset(
    problems: list[dict[str, Any]] | dict[str, Any], seed: int, tokenizer: Any, model_spec: dict[str, Any]
) -> TaskSet:
    """A role's task set: ``problems`` is a section's :meth:`~metaopt.posttrain.config.PostTrainSection.
    problem_source` (or a plain task list), prompts rendered with the role's own tokenizer (its chat template)."""
    source = problems if isinstance(problems, dict) else {"tasks": problems}
    render = prompt_renderer(tokenizer, model_spec.get("chat_template", "auto"))
    return make_taskset(**source, seed=seed, render=render)


def worker_device() -> torch.device:
    """The GPU Ray gave this process (``num_gpus`` > 0 on a GPU node), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: float) -> None:
    torch.set_num_threads(max(1, int(threads)))


def reference_logprobs(reference: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """log pi_ref of the sampled completion tokens (the k3 KL term's anchor), at the sampling temperature like
    the policy's log-probs in the learner."""
    with torch.inference_mode():
        return batch_logprobs(reference, batch)  # each group's prompt once, at the batch's sampling temperature


class _Role:
    device: torch.device

    def placement(self) -> dict[str, Any]:
        """Where this role runs: its torch device and the GPUs visible to it (Ray sets CUDA_VISIBLE_DEVICES
        for an actor that asked for ``num_gpus``)."""
        return {"device": str(self.device), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


class RolloutWorker(_Role):
    """Batched sampling of G completions per prompt with the latest policy weights."""

    def __init__(
        self,
        model_spec: dict[str, Any],
        problems: list[dict[str, Any]] | dict[str, Any],
        seed: int,
        *,
        with_reference: bool,
        threads: float = 1.0,
    ):
        set_threads(threads)
        self.device = worker_device()
        self.model, self.tokenizer = make_policy(model_spec, seed)
        self.model.to(self.device).eval()
        self.reference = copy.deepcopy(self.model) if with_reference else None
        self.taskset = worker_taskset(problems, seed, self.tokenizer, model_spec)

    def set_weights(self, weights: PackedWeights, reference: bool = False) -> None:
        state = unpack_weights(weights)
        set_weights(self.model, state)
        if reference and self.reference is not None:
            set_weights(self.reference, state)

    def sample(
        self, prompts: list[str], group_size: int, max_new_tokens: int, temperature: float, seed: int
    ) -> RolloutBatch:
        batch = sample_completions(self.model, self.tokenizer, prompts, group_size, max_new_tokens, temperature, seed)
        if self.reference is not None:
            batch.ref_logprobs = reference_logprobs(self.reference, batch)
        return batch.to("cpu")

    def evaluate(self, categories: list[str], per_category: int, seed: int, max_new_tokens: int) -> dict[str, float]:
        """Greedy accuracy per category on the held-out problems (:meth:`~metaopt.posttrain.tasks.TaskSet.held_out`):
        a dataset's held-out rows, each once (at most ``per_category``), never a training row; a generator's
        ``per_category`` problems drawn by ``seed``. Categories with as many problems are decoded together."""
        held_out = self.taskset.held_out()
        groups: dict[int, list[str]] = {}
        for category in categories:
            groups.setdefault(held_out.count(category, per_category), []).append(category)
        accuracy: dict[str, float] = {}
        for count, group in groups.items():
            accuracy.update(evaluate_accuracy(self.model, self.tokenizer, held_out, group, count, seed, max_new_tokens))
        return {category: accuracy[category] for category in categories}


class ReferenceWorker(_Role):
    """The frozen reference policy pi_ref on its own (its weights are set once, after the warm-up)."""

    def __init__(self, model_spec: dict[str, Any], seed: int, threads: float = 1.0):
        set_threads(threads)
        self.device = worker_device()
        self.model, _ = make_policy(model_spec, seed)
        self.model.to(self.device).eval()

    def set_weights(self, weights: PackedWeights, reference: bool = True) -> None:
        set_weights(self.model, unpack_weights(weights))

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        return reference_logprobs(self.model, batch.to(self.device)).cpu()


class LearnerWorker(_Role):
    """The trained policy: supervised warm-up on demonstrations, then GRPO updates with a metaopt.optim
    optimizer and schedule."""

    def __init__(
        self,
        model_spec: dict[str, Any],
        problems: list[dict[str, Any]] | dict[str, Any],
        seed: int,
        *,
        grpo: dict[str, Any],
        optimizer: dict[str, Any],
        schedule: dict[str, Any] | None,
        threads: float = 1.0,
    ):
        set_threads(threads)
        torch.manual_seed(seed)
        self.device = worker_device()
        self.seed = seed
        self.model, self.tokenizer = make_policy(model_spec, seed)
        self.model.to(self.device)
        self.taskset = worker_taskset(problems, seed, self.tokenizer, model_spec)
        self.learner = GRPOLearner(
            self.model,
            None,
            optimizer_spec=optimizer,
            schedule_spec=schedule,
            clip_eps=grpo["clip_eps"],
            beta=grpo["beta"],
            updates_per_batch=grpo["updates_per_batch"],
            minibatch_size=grpo["minibatch_size"],
            max_grad_norm=grpo["max_grad_norm"],
            aggregation=grpo["loss_aggregation"],
        )

    def warmup(self, categories: list[str], steps: int, batch_size: int, lr: float) -> dict[str, float]:
        return supervised_warmup(self.model, self.tokenizer, self.taskset, categories, steps, batch_size, lr, self.seed)

    def step(self, batch: RolloutBatch, advantages: torch.Tensor) -> tuple[dict[str, float], PackedWeights]:
        """One GRPO update; returns its metrics and the new weights (two Ray returns: the weights go on to the
        rollout workers as an object reference, without passing through the driver)."""
        metrics = self.learner.step(batch.to(self.device), advantages.to(self.device))
        return metrics, self.weights()

    def weights(self) -> PackedWeights:
        return pack_weights(get_weights(self.model))

    def set_schedule(self, schedule: dict[str, Any]) -> None:
        """A new lr schedule (PBT's explore step) that keeps the optimizer's moments."""
        from metaopt.optim import build_schedule

        self.learner.schedule = build_schedule(schedule)

    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state)


class Roles:
    """Rollout workers, the learner and the optional reference worker, local or Ray actors, one interface:
    :meth:`call` starts a method (an ObjectRef for actors, the value itself locally), :meth:`get` waits."""

    def __init__(self, rollout: list[Any], learner: Any, reference: Any | None, remote: bool):
        self.rollout, self.learner, self.reference, self.remote = rollout, learner, reference, remote

    def call(self, handle: Any, method: str, *args: Any, num_returns: int = 1, **kwargs: Any) -> Any:
        function = getattr(handle, method)
        if not self.remote:
            return function(*args, **kwargs)
        if num_returns != 1:
            function = function.options(num_returns=num_returns)
        return function.remote(*args, **kwargs)

    def get(self, value: Any) -> Any:
        if not self.remote:
            return value
        import ray

        return ray.get(value)

    def close(self) -> None:
        if not self.remote:  # in-process roles: stop their reward worker processes (actors' end with them)
            for worker in [*self.rollout, self.learner]:
                worker.taskset.close()
            return
        import ray

        for actor in [*self.rollout, self.learner, *([self.reference] if self.reference is not None else [])]:
            ray.kill(actor)


def start_roles(section: Any, seed: int) -> Roles:
    """Build the roles the ``roles:`` block asks for (``section`` is a PostTrainSection)."""
    roles = section.roles
    model_spec = section.model.model_dump()
    tasks = section.problem_source()
    reference_in_rollout = section.grpo.beta > 0 and roles.reference == "rollout"
    separate_reference = section.grpo.beta > 0 and roles.reference == "actor"
    learner_args = (model_spec, tasks, seed)
    learner_kwargs = {
        "grpo": section.grpo.model_dump(),
        "optimizer": section.optimizer.model_dump(),
        "schedule": None,  # GRPORun sets it (loop.schedule_spec), also after a PBT explore
        "threads": roles.cpus_per_actor,
    }
    if roles.mode == "colocated":
        threads = {"threads": roles.cpus_per_actor}
        rollout = [RolloutWorker(model_spec, tasks, seed, with_reference=section.grpo.beta > 0, **threads)]
        return Roles(rollout, LearnerWorker(*learner_args, **learner_kwargs), None, remote=False)
    import ray

    cpus = roles.cpus_per_actor
    # OpenMP threads that spin while waiting steal the cores the other roles need (GRPO steps ran many times slower
    # with 2 threads on 2 shared cores, probed with benchmarks/grpo_throughput.py; figures in
    # benchmarks/results.csv); passive waiting costs nothing when a role has its cores.
    env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    rollout_actor = ray.remote(num_cpus=cpus, num_gpus=roles.gpus_per_rollout, runtime_env=env)(RolloutWorker)
    learner_actor = ray.remote(num_cpus=cpus, num_gpus=roles.gpus_per_learner, runtime_env=env)(LearnerWorker)
    rollout = [
        rollout_actor.remote(model_spec, tasks, seed, with_reference=reference_in_rollout, threads=cpus)
        for _ in range(roles.rollout_workers)
    ]
    reference = None
    if separate_reference:
        reference = ray.remote(num_cpus=cpus, num_gpus=roles.gpus_per_rollout, runtime_env=env)(ReferenceWorker).remote(
            model_spec, seed, threads=cpus
        )
    return Roles(rollout, learner_actor.remote(*learner_args, **learner_kwargs), reference, remote=True)


def role_bundles(section: Any, per_trial: dict[str, float]) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: the trial process, then learner, rollout workers, reference."""
    roles = section.roles
    bundles = [{"CPU": per_trial["cpu"], "GPU": per_trial["gpu"]}]
    if roles.mode == "colocated":
        return bundles
    bundles.append({"CPU": roles.cpus_per_actor, "GPU": roles.gpus_per_learner})
    bundles += [{"CPU": roles.cpus_per_actor, "GPU": roles.gpus_per_rollout}] * roles.rollout_workers
    if section.grpo.beta > 0 and roles.reference == "actor":
        bundles.append({"CPU": roles.cpus_per_actor, "GPU": roles.gpus_per_rollout})
    return bundles
