"""One GRPO post-training run: curriculum -> prompts -> rollouts -> verifiable rewards -> advantages -> learner.

Per step (Shao et al. 2024, GRPO; Chen et al. 2025, Self-Evolving Curriculum):

1. the curriculum draws a category for each of ``prompts_per_step`` prompts and the task set draws a problem of
   that category;
2. the rollout workers sample G completions per prompt (each worker a share of the prompts) with the policy
   weights they last received, plus the reference log-probs when the reference lives with them;
3. rewards are checked against the problems' answers; advantages are normalised within each group of G;
4. the curriculum is rewarded per category with the mean absolute advantage of its completions (SEC's learning
   gain signal) and advanced;
5. the learner takes its GRPO update(s) and its new weights go to every rollout worker through the object store.

With ``roles.overlap`` the rollouts of step t+1 are started before the learner's update of step t, so sampling
and learning run at the same time on different actors; step t+1's samples then come from the weights one update
old and the clipped importance ratio (old log-probs = the sampling policy's) corrects for it. The curriculum keeps
the paper's order by default (``curriculum.update: before_next_draw``): step t's rewards update it (4) before it
draws step t+1's categories, so only the learner's update overlaps the sampling. ``curriculum.update:
overlapped`` starts step t+1's rollouts as soon as step t's batch is in, before its rewards are scored: the
rollout workers never wait for the scorer, and the curriculum's draw for t+1 lags one update behind.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from metaopt.posttrain.curriculum import category_rewards, make_curriculum
from metaopt.posttrain.grpo import group_advantages
from metaopt.posttrain.policy import load_prompt_renderer
from metaopt.posttrain.roles import PackedWeights, Roles
from metaopt.posttrain.sampling import RolloutBatch, concat_batches
from metaopt.posttrain.tasks import Problem, make_taskset


def schedule_spec(section: Any, lr: float | None) -> dict[str, Any]:
    """The learner's lr schedule over GRPO steps; ``lr`` (a PBT-chosen value) replaces the schedule's peak."""
    spec = section.schedule.model_dump() if section.schedule else {"name": "constant", "lr": section.optimizer.lr}
    if lr is not None:
        spec["lr"] = float(lr)
    return spec


def split_prompts(count: int, workers: int) -> list[slice]:
    """Contiguous, near-equal shares of the prompts for the rollout workers (empty shares dropped)."""
    bounds = [int(b) for b in np.linspace(0, count, workers + 1).round()]
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


@dataclass
class PendingRollout:
    problems: list[Problem]
    category_ids: np.ndarray
    handles: list[Any]
    started: float


@dataclass
class GRPORun:
    """A post-training run driving :class:`~metaopt.posttrain.roles.Roles`; ``step()`` is one GRPO step."""

    section: Any
    curriculum_name: str
    seed: int
    roles: Roles
    lr: float | None = None
    steps_done: int = 0
    warmed_up: bool = False
    pending: PendingRollout | None = None
    warmup_metrics: dict[str, float] = field(default_factory=dict)
    # The reference policy's weights when they differ from what make_policy rebuilds (i.e. after a warm-up).
    reference_weights: Any = None  # PackedWeights

    def __post_init__(self) -> None:
        render = load_prompt_renderer(self.section.model.model_dump())  # the workers' prompts, without a model
        self.taskset = make_taskset(**self.section.problem_source(), seed=self.seed, render=render)
        self.categories = list(self.taskset.categories)
        options = {"alpha": self.section.curriculum.alpha, "tau": self.section.curriculum.tau}
        self.curriculum = make_curriculum(
            self.curriculum_name, len(self.categories), **(options if self.curriculum_name == "sec" else {})
        )
        self.rng = np.random.default_rng([self.seed, 1])
        self.roles.get(self.roles.call(self.roles.learner, "set_schedule", schedule_spec(self.section, self.lr)))

    # ------------------------------------------------------------------------------------------ set-up
    def warm_up(self) -> dict[str, float]:
        """Supervised warm-up on demonstrations, then the warmed-up weights become policy *and* reference."""
        warm = self.section.warmup
        metrics: dict[str, float] = {}
        if warm.steps:
            levels = warm.levels
            categories = [c for c in self.categories if levels is None or self.taskset.difficulty(c) in levels]
            metrics = self.roles.get(
                self.roles.call(
                    self.roles.learner, "warmup", categories or self.categories, warm.steps, warm.batch_size, warm.lr
                )
            )
        weights = self.roles.call(self.roles.learner, "weights")
        if warm.steps:
            self.reference_weights = self.roles.get(weights)
        self.send_weights(weights, reference=True)
        self.warmed_up = True
        self.warmup_metrics = {f"warmup_{k}": float(v) for k, v in (metrics or {}).items()}
        return self.warmup_metrics

    def sync_weights(self, reference: bool = False) -> None:
        """Learner -> rollout workers (and, with ``reference``, the reference policy)."""
        self.send_weights(self.roles.call(self.roles.learner, "weights"), reference)

    def send_weights(self, weights: Any, reference: bool = False) -> None:
        """Through the object store: the learner's packed weights are one object that every worker reads by
        reference; the driver never holds them. Without overlap, wait until every worker has them."""
        receivers = list(self.roles.rollout) + ([self.roles.reference] if reference and self.roles.reference else [])
        done = [self.roles.call(w, "set_weights", weights, reference) for w in receivers]
        if not self.section.roles.overlap or reference:
            for receipt in done:
                self.roles.get(receipt)

    # ------------------------------------------------------------------------------------------ one step
    def launch(self) -> PendingRollout:
        grpo = self.section.grpo
        category_ids = self.curriculum.sample(self.rng, grpo.prompts_per_step)
        problems = [self.taskset.sample(self.categories[int(c)], self.rng) for c in category_ids]
        prompts = [p.prompt for p in problems]
        handles = []
        shares = split_prompts(len(prompts), len(self.roles.rollout))
        for index, (worker, share) in enumerate(zip(self.roles.rollout, shares)):
            seed = int(self.seed * 1_000_003 + self.steps_done * 101 + index)
            handles.append(
                self.roles.call(
                    worker, "sample", prompts[share], grpo.group_size, grpo.max_new_tokens, grpo.temperature, seed
                )
            )
        return PendingRollout(problems, np.asarray(category_ids), handles, time.perf_counter())

    def step(self) -> dict[str, Any]:
        if not self.warmed_up:
            self.warm_up()
        grpo = self.section.grpo
        started = time.perf_counter()
        pending = self.pending or self.launch()
        batch: RolloutBatch = concat_batches([self.roles.get(h) for h in pending.handles])
        sampled = time.perf_counter()
        overlap = self.section.roles.overlap
        lagged = overlap and self.section.curriculum.update == "overlapped"
        self.pending = self.launch() if lagged else None
        rewards = torch.tensor(
            [
                self.taskset.reward(problem, text)
                for problem, text in zip(np.repeat(pending.problems, grpo.group_size), batch.completions)
            ],
            dtype=torch.float32,
        )
        advantages = group_advantages(rewards, grpo.group_size)
        gains = category_rewards(pending.category_ids, advantages, grpo.group_size)
        self.curriculum.update(gains)
        self.curriculum.advance(self.steps_done + 1, self.section.steps)
        if overlap and not lagged:  # the paper's order: step t's feedback is in before step t+1's draw
            self.pending = self.launch()
        if self.roles.reference is not None:
            batch.ref_logprobs = self.roles.get(self.roles.call(self.roles.reference, "logprobs", batch))
        metrics_ref, weights = self.roles.call(self.roles.learner, "step", batch, advantages, num_returns=2)
        self.send_weights(weights)
        metrics = dict(self.roles.get(metrics_ref))
        self.steps_done += 1
        elapsed = time.perf_counter() - started
        metrics.update(self.step_metrics(pending, rewards, batch, gains, elapsed, sampled - started))
        metrics["reward_failures"] = self.taskset.reward_failures  # so far in this process: 0 unless a scorer failed
        return metrics

    def step_metrics(
        self,
        pending: PendingRollout,
        rewards: torch.Tensor,
        batch: RolloutBatch,
        gains: dict[int, float],
        elapsed: float,
        waited: float,
    ) -> dict[str, Any]:
        group = self.section.grpo.group_size
        solved = rewards.reshape(-1, group)
        metrics: dict[str, Any] = {
            "reward": float(rewards.mean()),
            "solved_any": float((solved.max(dim=1).values > 0).float().mean()),
            "completions_per_s": len(batch.completions) / max(elapsed, 1e-9),
            "rollout_wait_s": waited,
            "completion_tokens": float(batch.completion_mask.sum(dim=1).float().mean()),
            "grpo_step": self.steps_done,
        }
        probabilities = self.curriculum.probabilities()
        for index, name in enumerate(self.categories):
            metrics[f"p/{name}"] = float(probabilities[index])
            mask = pending.category_ids == index
            if mask.any():
                metrics[f"train_reward/{name}"] = float(solved[torch.from_numpy(mask)].mean())
        for index, gain in gains.items():
            metrics[f"gain/{self.categories[index]}"] = gain
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy per category on fixed problems (the same every call), on rollout worker 0: a dataset's
        held-out rows (the same for every trial, never trained on), a generator's items drawn by ``10_000 + seed``
        (other items than training draws)."""
        accuracy = self.roles.get(
            self.roles.call(
                self.roles.rollout[0],
                "evaluate",
                self.categories,
                self.section.eval_per_category,
                10_000 + self.seed,
                self.section.grpo.max_new_tokens,
            )
        )
        out = {f"accuracy/{name}": float(accuracy[name]) for name in self.categories}
        out["accuracy"] = float(np.mean([accuracy[name] for name in self.categories]))
        return out

    def sample_text(self, count: int) -> str:
        """A few prompts with one sampled completion each and the reward (logged as a text artifact)."""
        grpo = self.section.grpo
        categories = self.curriculum.sample(np.random.default_rng([self.seed, self.steps_done, 7]), count)
        problems = [
            self.taskset.sample(self.categories[int(c)], np.random.default_rng([self.seed, self.steps_done, i]))
            for i, c in enumerate(categories)
        ]
        batch = self.roles.get(
            self.roles.call(
                self.roles.rollout[0],
                "sample",
                [p.prompt for p in problems],
                1,
                grpo.max_new_tokens,
                grpo.temperature,
                self.steps_done,
            )
        )
        lines = [f"# step {self.steps_done}: prompt | completion | answer | reward"]
        for problem, text in zip(problems, batch.completions):
            lines.append(
                f"[{problem.category}] {problem.prompt!r} | {text!r} | {problem.answer!r} | "
                f"{self.taskset.reward(problem, text):g}"
            )
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "warmed_up": self.warmed_up,
            "curriculum": self.curriculum.state_dict(),
            "rng": self.rng.bit_generator.state,
            "learner": self.roles.get(self.roles.call(self.roles.learner, "state_dict")),
            "reference": None if self.reference_weights is None else asdict(self.reference_weights),
            "warmup_metrics": self.warmup_metrics,
            "pending": self.pending_state(),
        }

    def pending_state(self) -> dict[str, Any] | None:
        """The rollout in flight (overlap: step t+1's batch, sampled with the weights before update t from prompts
        the RNG has already drawn), waited for and stored as plain data, so a resumed run trains on the very
        batch an uninterrupted one would instead of drawing another with different weights and prompts."""
        if self.pending is None:
            return None
        return {
            "problems": [asdict(p) for p in self.pending.problems],
            "category_ids": [int(c) for c in self.pending.category_ids],
            "batches": [asdict(self.roles.get(h)) for h in self.pending.handles],
        }

    def restore_pending(self, saved: dict[str, Any] | None) -> PendingRollout | None:
        """Inverse of :meth:`pending_state`: the stored batches stand in for the rollout workers' answers."""
        if saved is None:
            return None
        batches = [RolloutBatch(**b) for b in saved["batches"]]
        if self.roles.remote:
            import ray

            batches = [ray.put(b) for b in batches]
        return PendingRollout(
            [Problem(**p) for p in saved["problems"]], np.asarray(saved["category_ids"]), batches, time.perf_counter()
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: learner (model, optimizer, step), curriculum, RNG; rollout workers get the learner's weights
        and the reference its saved weights; the rollout in flight when the checkpoint was taken is the saved one."""
        self.steps_done = int(state["steps_done"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.rng.bit_generator.state = state["rng"]
        self.warmup_metrics = dict(state.get("warmup_metrics", {}))
        self.roles.get(self.roles.call(self.roles.learner, "load_state_dict", state["learner"]))
        self.pending = self.restore_pending(state.get("pending"))
        self.warmed_up = bool(state["warmed_up"])
        if self.warmed_up:
            saved = state.get("reference")
            self.reference_weights = (
                None
                if saved is None
                else PackedWeights(
                    saved["buffer"], tuple((n, d, tuple(shape), o, z) for n, d, shape, o, z in saved["entries"])
                )
            )
            self.restore_reference()
            self.sync_weights()

    def restore_reference(self) -> None:
        weights = self.reference_weights
        if weights is None:
            return
        receivers = list(self.roles.rollout) + ([self.roles.reference] if self.roles.reference else [])
        for worker in receivers:  # reference=True also overwrites the worker's policy; sync_weights follows
            self.roles.get(self.roles.call(worker, "set_weights", weights, True))
