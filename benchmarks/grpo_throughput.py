"""Completions per second of our GRPO loop against TRL's ``GRPOTrainer``, same model, task and batch, 2 CPUs.

    .venv/bin/python benchmarks/grpo_throughput.py [--steps 8] [--untimed-steps 1] [--repeats 3]
        [--group-size 8] [--prompts 16] [--max-new-tokens 6] [--hidden 64] [--layers 2] [--heads 4]
        [--levels 1 2 3] [--beta 0.04] [--lr 1e-3] [--modes actors-overlap actors colocated]
        [--trl-threads 1 2] [--colocated-threads 1] [--sft-steps 0] [--no-breakdown] [--set KEY=VALUE ...]

What is measured: completions per second of whole GRPO steps in steady state. One GRPO step = ``prompts``
prompts x G sampled completions (at most ``max_new_tokens`` tokens, stopping at ``<eos>``), their rewards
(our arithmetic verifier), group-normalised advantages, the reference model's log-probs of the completions
(KL weight ``beta``), one optimizer update on the whole batch, and (ours) the new weights sent to the rollout
side. The first ``--untimed-steps`` step(s) of every run are not timed (actor start-up, first kernels, lazy
imports); then ``--steps`` steps are timed, and completions/s = prompts x G x steps / wall seconds.

* TRL: ``trl.GRPOTrainer.train()`` for untimed + timed steps in this process, once per ``--trl-threads``
  torch thread count. A ``TrainerCallback`` records the time at the end of every optimizer step; the timed
  wall is from the end of the last untimed step to the end of the last step. Each step generates one batch
  of prompts x G (``per_device_train_batch_size = generation_batch_size = prompts x G``, ``num_generations =
  G``, ``steps_per_generation = num_iterations = 1``), so every generation is followed by exactly one update.
  The trainer's ``_generate`` and ``_generate_and_score_completions`` are wrapped with a clock to split a
  step into generation, generation + reference + rewards, and the update.
* ours: a local Ray (``ray.init(num_cpus=2)``), ``metaopt.posttrain.roles.start_roles`` + ``loop.GRPORun`` with
  the uniform curriculum; the wall of ``run.step()`` calls. Modes: ``actors-overlap`` (the headline: a rollout
  actor holding the reference and a learner actor, 1 CPU and 1 thread each, the rollouts of step t+1 sampled
  while the learner trains on step t — one step off-policy, corrected by the clipped ratio, where TRL here is
  on-policy), ``actors`` (the same actors, strictly alternating), ``colocated`` (all roles in this process,
  ``--colocated-threads``).

``--set KEY=VALUE`` (keys below ``posttrain.``) overrides the section both sides read: TRL takes G, prompts per
step, completion length, temperature, beta, clip, updates per batch, grad-norm clip and the AdamW settings from
it; settings TRL cannot mirror (another optimizer, an lr schedule, our own warm-up) are refused.

Every side runs ``--repeats`` times, interleaved (TRL, then our modes, then again), and each side's best run
counts: on a shared machine load only ever slows a run down, and the same rule applies to both sides. A TRL
thread count slower than half the best TRL in the first repeat is not repeated.

How it is made fair: both sides load the *same* tiny Qwen2 from one local directory (built by
``metaopt.posttrain.policy.make_policy`` with the char tokenizer and ``--seed``, optionally after
``--sft-steps`` of ``metaopt.posttrain.warmup.supervised_warmup``, then ``save_pretrained``; no supervised
warm-up by default, so both start from the same random policy and generate near-maximal lengths), fp32 on
the CPU. Same prompt distribution (``metaopt.posttrain.tasks`` arithmetic at ``--levels``, categories drawn
uniformly), same G, prompts per step, ``max_new_tokens`` = ``max_completion_length``, temperature 1.0 with
top-k/top-p off, stop at ``<eos>`` on both sides (TRL masks after the first ``<eos>``; our sampler stops
there too and counts the ``<eos>`` token, as TRL's ``completion_ids`` do), the same ``beta`` (so TRL also
keeps and runs a reference model), clip 0.2, one update per batch, sequence-mean loss (TRL
``loss_type="grpo"``), AdamW with the same constant learning rate, no weight decay, grad-norm clip 1.0, no
gradient checkpointing, no bf16, no logging/saving/reporting in TRL. The reward is our task's verifier
wrapped as a TRL reward function (it also records TRL's completion lengths); the table prints the mean
completion tokens of every side as the check that they did the same work. TRL gets its best thread count,
and ``OMP_WAIT_POLICY=PASSIVE`` is set for the whole run (before torch loads): with OpenMP's default
spinning, 2 torch threads on 2 cores shared with other work ran many times slower than 1 thread (figures in
results.csv), which would make TRL's 2-thread figure meaningless. The one difference kept by design is the
sampler: TRL decodes with ``model.generate``, we with our own KV-cache loop.

Printed: per side the best completions/s and every repeat's, mean completion tokens, wall per step, for ours
the time the driver waited for rollouts; TRL's step split; unless ``--no-breakdown``, the parts of our step
timed in this process on 1 thread (our sampler, ``model.generate`` on the same batch, reference log-probs,
rewards, learner update, weight copy) and Ray round trips from the driver to an actor (no-op, and carrying
the policy's weights); the load average before and after, and at the start and the end how many cores two
busy single-threaded processes get together (two concurrent matmul loops vs one; 2.00 on an idle 2-core
machine — overlapping rollout and learner can gain at most that factor over running them one after the
other, so on a machine shared with other work the overlap's gain shrinks towards 1); and last
``ratio: X.XX`` = ours (actors-overlap, or the first of ``--modes``) / best TRL completions/s (goal >= 1.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from results import append, command_line  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
# Nothing may come from the Hugging Face hub: the model and tokenizer are written to a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning; read once when torch loads, so it is set before any import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MODES = ("actors-overlap", "actors", "colocated")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed GRPO steps per side")
    p.add_argument(
        "--untimed-steps",
        "--warmup-steps-measure",
        dest="untimed_steps",
        type=int,
        default=1,
        help="first GRPO steps of each side that are run but not timed",
    )
    p.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompts", type=int, default=16, help="prompts per GRPO step")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], help="arithmetic levels (categories)")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0: both sides run a reference model)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--sft-steps",
        type=int,
        default=0,
        help="supervised warm-up steps applied once to the shared model before both sides (0 = none)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="our role modes to time; the first one is the ratio's numerator",
    )
    p.add_argument(
        "--trl-threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch threads of the TRL process, each timed; the fastest is the ratio's denominator",
    )
    p.add_argument("--colocated-threads", type=int, default=1, help="torch threads of our colocated mode")
    p.add_argument("--skip-trl", action="store_true", help="time only ours (no ratio line)")
    p.add_argument("--skip-ours", action="store_true", help="time only TRL (no ratio line)")
    p.add_argument(
        "--no-breakdown", action="store_true", help="skip timing the parts of our step in-process (1 thread)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of every side, interleaved; each side's best counts (a TRL thread count under "
        "half the best TRL's speed in the first repeat is not repeated)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override in the posttrain section both sides read, e.g. grpo.beta=0 or "
        "roles.cpus_per_actor=0.5 (keys below posttrain.; roles.mode/overlap come from --modes)",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.untimed_steps < 1 or args.repeats < 1:
        p.error("--steps, --untimed-steps and --repeats must be >= 1")
    return args


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------ shared set-up
def section_raw(args: argparse.Namespace) -> dict:
    """Our posttrain section as a plain mapping (``--set`` applies to it before validation)."""
    return {
        "model": {
            "arch": "qwen2",
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "max_positions": 128,
        },
        "tasks": [{"name": "arithmetic", "levels": list(args.levels)}],
        "curricula": ["uniform"],
        "grpo": {
            "group_size": args.group_size,
            "prompts_per_step": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
            "clip_eps": 0.2,
            "beta": args.beta,
            "updates_per_batch": 1,
            "max_grad_norm": 1.0,
        },
        "warmup": {"steps": 0},  # the shared model directory already holds any warm-up (--sft-steps)
        "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": 0.0},
        "roles": {
            "mode": "actors",
            "rollout_workers": 1,
            "reference": "rollout",
            "overlap": True,
            "cpus_per_actor": 1.0,
        },
        "steps": 10_000,
        "steps_per_iteration": 10_000,
        "seeds": [args.seed],
    }


def apply_overrides(raw: dict, extra: list[str]) -> dict:
    """``--set`` overrides on the section mapping; they apply to both sides (TRL reads the validated section)."""
    import copy

    from metaopt.config import apply_override

    raw = copy.deepcopy(raw)
    for override in extra:
        apply_override(raw, override)
    return raw


def build_section(raw: dict, mode: str, colocated_threads: int = 1):
    """The validated section for one of our modes: ``--modes`` decides roles.mode and roles.overlap (and the
    colocated mode's threads); every other key is as given."""
    import copy

    from pydantic import ValidationError

    from metaopt.config import first_error
    from metaopt.posttrain.config import PostTrainSection

    raw = copy.deepcopy(raw)
    roles = raw.setdefault("roles", {})
    if mode == "colocated":
        roles.update(mode="colocated", overlap=False, cpus_per_actor=float(colocated_threads))
    else:
        roles.update(mode="actors", overlap=mode == "actors-overlap")
    try:
        section = PostTrainSection.model_validate(raw)
    except ValidationError as err:
        raise SystemExit(str(first_error("posttrain", PostTrainSection, err))) from None
    return section


def check_comparable(section, ray_cpus: int, mode: str) -> None:
    """Settings TRL cannot mirror, or that Ray cannot place, stop the benchmark before anything slow starts."""
    from metaopt.optim import resolve_optimizer_spec

    optimizer = resolve_optimizer_spec(section.optimizer)
    problems = []
    if optimizer["name"] != "adamw":
        problems.append(f"optimizer.name={optimizer['name']} (TRL side: AdamW only)")
    if section.schedule is not None:
        problems.append("schedule (TRL side: constant lr only)")
    if section.warmup.steps:
        problems.append("warmup.steps > 0 (use --sft-steps: one warm-up shared by both sides)")
    if section.model.path is not None:
        problems.append("model.path (the benchmark writes the shared tiny model itself)")
    roles = section.roles
    actors = roles.rollout_workers + 1 + (section.grpo.beta > 0 and roles.reference == "actor")
    if roles.mode == "actors" and actors * roles.cpus_per_actor > ray_cpus:
        problems.append(
            f"{actors} actors x {roles.cpus_per_actor} CPUs exceed --ray-cpus {ray_cpus} "
            "(lower roles.cpus_per_actor or raise --ray-cpus)"
        )
    if problems:
        raise SystemExit(f"mode {mode}: not comparable or not placeable: " + "; ".join(problems))


def write_shared_policy(common, directory: Path, args: argparse.Namespace) -> dict:
    """The one policy both sides start from, saved with its tokenizer; returns warm-up metrics (if any)."""
    from metaopt.posttrain.policy import make_policy

    model, tokenizer = make_policy(common.model.model_dump(), args.seed)
    metrics: dict = {}
    if args.sft_steps:
        import torch

        from metaopt.posttrain.tasks import make_taskset
        from metaopt.posttrain.warmup import supervised_warmup

        taskset = make_taskset([t.model_dump() for t in common.tasks], args.seed)
        torch.manual_seed(args.seed)
        metrics = supervised_warmup(
            model, tokenizer, taskset, list(taskset.categories), args.sft_steps, 64, 3e-3, args.seed
        )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return metrics


def sample_problems(tasks: list[dict], count: int, seed: int) -> list:
    """``count`` problems with categories drawn uniformly, as our uniform curriculum does."""
    import numpy as np

    from metaopt.posttrain.tasks import make_taskset

    taskset = make_taskset(tasks, seed)
    rng = np.random.default_rng([seed, 99])
    categories = rng.integers(len(taskset.categories), size=count)
    return [taskset.sample(taskset.categories[int(c)], rng) for c in categories]


# ------------------------------------------------------------------------------------------ TRL
def time_trl(common, model_dir: Path, out_dir: Path, threads: int, args: argparse.Namespace) -> dict:
    """Completions/s of ``trl.GRPOTrainer`` with the settings of our section ``common``, ``threads`` torch threads."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from metaopt.optim import resolve_optimizer_spec
    from metaopt.posttrain.tasks import Problem, make_taskset
    from metaopt.posttrain.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    total_steps = args.untimed_steps + args.steps
    grpo, tasks = common.grpo, [t.model_dump() for t in common.tasks]
    optimizer = resolve_optimizer_spec(common.optimizer)
    per_step = grpo.prompts_per_step * grpo.group_size
    problems = sample_problems(tasks, grpo.prompts_per_step * total_steps, args.seed)
    dataset = Dataset.from_dict(
        {
            "prompt": [p.prompt for p in problems],
            "answer": [p.answer for p in problems],
            "category": [p.category for p in problems],
        }
    )
    taskset = make_taskset(tasks, args.seed)
    lengths: list[int] = []

    def arithmetic_reward(prompts, completions, completion_ids, answer, category, **_):
        lengths.extend(len(ids) for ids in completion_ids)
        return [
            taskset.reward(Problem(prompt, a, c), text)
            for prompt, text, a, c in zip(prompts, completions, answer, category)
        ]

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1,
        num_generations=grpo.group_size,
        max_completion_length=grpo.max_new_tokens,
        temperature=grpo.temperature,
        top_k=0,
        top_p=1.0,
        beta=grpo.beta,
        epsilon=grpo.clip_eps,
        num_iterations=grpo.updates_per_batch,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=optimizer["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=optimizer["weight_decay"],
        adam_beta1=optimizer["betas"][0],
        adam_beta2=optimizer["betas"][1],
        adam_epsilon=optimizer["eps"],
        max_grad_norm=grpo.max_grad_norm,
        optim="adamw_torch",
        max_steps=total_steps,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
        shuffle_dataset=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[arithmetic_reward],
        args=config,
        train_dataset=dataset,
        processing_class=load_tokenizer(str(model_dir)),
        callbacks=[StepClock()],
    )
    # Where a step's time goes: the trainer calls these through ``self``, so instance attributes wrap them.
    intervals: dict[str, list[tuple[float, float]]] = {"_generate": [], "_generate_and_score_completions": []}
    for method_name, spans in intervals.items():
        setattr(trainer, method_name, clocked(getattr(trainer, method_name), spans))
    trainer.train()
    if len(step_ends) != total_steps:
        raise RuntimeError(f"TRL ran {len(step_ends)} optimizer steps, expected {total_steps}")
    timed_from = step_ends[args.untimed_steps - 1]
    wall = step_ends[-1] - timed_from
    timed_lengths = lengths[args.untimed_steps * per_step :]

    def per_timed_step(spans: list[tuple[float, float]]) -> float:
        return sum(end - start for start, end in spans if start >= timed_from) / args.steps

    return {
        "completions_per_s": per_step * args.steps / wall,
        "tokens": statistics.fmean(timed_lengths),
        "step_s": wall / args.steps,
        "wait_s": float("nan"),
        "generate_s": per_timed_step(intervals["_generate"]),
        "rollout_s": per_timed_step(intervals["_generate_and_score_completions"]),
    }


def clocked(function, spans: list[tuple[float, float]]):
    """``function`` that appends the (start, end) of every call to ``spans``."""

    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return function(*a, **k)
        finally:
            spans.append((start, time.perf_counter()))

    return wrapper


# ------------------------------------------------------------------------------------------ ours
def time_ours(raw: dict, mode: str, model_dir: Path, args: argparse.Namespace) -> dict:
    import torch

    from metaopt.posttrain.loop import GRPORun
    from metaopt.posttrain.roles import start_roles

    raw = {**raw, "model": {**raw["model"], "path": str(model_dir)}}
    section = build_section(raw, mode, args.colocated_threads)
    driver_threads = torch.get_num_threads()
    roles = start_roles(section, args.seed)
    try:
        run = GRPORun(section, "uniform", args.seed, roles)
        run.warm_up()  # warmup.steps = 0: only sends the weights to the rollout side (policy and reference)
        for _ in range(args.untimed_steps):
            run.step()
        started = time.perf_counter()
        metrics = [run.step() for _ in range(args.steps)]
        wall = time.perf_counter() - started
    finally:
        roles.close()
        torch.set_num_threads(driver_threads)  # colocated roles set this process's threads
    completions = section.grpo.prompts_per_step * section.grpo.group_size * args.steps
    return {
        "completions_per_s": completions / wall,
        "tokens": statistics.fmean(m["completion_tokens"] for m in metrics),
        "step_s": wall / args.steps,
        "wait_s": statistics.fmean(m["rollout_wait_s"] for m in metrics),
    }


def breakdown_ours(common, model_dir: Path, args: argparse.Namespace, repeats: int = 5) -> dict[str, float]:
    """Seconds of each part of one of our GRPO steps, in this process on 1 thread (median of ``repeats`` after
    one unclocked call), next to ``model.generate`` (the sampler TRL uses) on the same prompts and policy."""
    import torch
    from transformers import GenerationConfig

    from metaopt.posttrain.grpo import group_advantages
    from metaopt.posttrain.roles import LearnerWorker, RolloutWorker, reference_logprobs
    from metaopt.posttrain.sampling import sample_completions

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    grpo, tasks, model_spec = common.grpo, [t.model_dump() for t in common.tasks], {"path": str(model_dir)}
    rollout = RolloutWorker(model_spec, tasks, args.seed, with_reference=True, threads=1)
    learner = LearnerWorker(
        model_spec,
        tasks,
        args.seed,
        grpo=grpo.model_dump(),
        optimizer=common.optimizer.model_dump(),
        schedule={"name": "constant", "lr": common.optimizer.lr},
        threads=1,
    )
    problems = sample_problems(tasks, grpo.prompts_per_step, args.seed + 1)
    prompts = [p.prompt for p in problems]
    group, new_tokens, temperature = grpo.group_size, grpo.max_new_tokens, grpo.temperature
    encoded = rollout.tokenizer(
        prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt"
    )
    encoded = {k: v.repeat_interleave(group, dim=0) for k, v in encoded.items()}
    generation = GenerationConfig(
        do_sample=True,
        max_new_tokens=new_tokens,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        pad_token_id=rollout.tokenizer.pad_token_id,
        eos_token_id=rollout.tokenizer.eos_token_id,
        disable_compile=True,
    )
    batch = sample_completions(rollout.model, rollout.tokenizer, prompts, group, new_tokens, temperature, 0)
    batch.ref_logprobs = reference_logprobs(rollout.reference, batch)

    def rewards_and_advantages():
        rewards = torch.tensor(
            [
                rollout.taskset.reward(p, text)
                for p, text in zip([p for p in problems for _ in range(group)], batch.completions)
            ]
        )
        return group_advantages(rewards, group)

    advantages = rewards_and_advantages()
    parts = {
        "our sampler (sample_completions)": lambda: sample_completions(
            rollout.model, rollout.tokenizer, prompts, group, new_tokens, temperature, 0
        ),
        "model.generate (TRL's sampler)": lambda: rollout.model.generate(**encoded, generation_config=generation),
        "reference log-probs": lambda: reference_logprobs(rollout.reference, batch),
        "rewards + advantages": rewards_and_advantages,
        "learner step (fwd+bwd+AdamW)": lambda: learner.step(batch, advantages),
        "weights learner -> rollout": lambda: rollout.set_weights(learner.weights()),
    }
    seconds = {}
    try:
        for name, part in parts.items():
            part()
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                part()
                times.append(time.perf_counter() - started)
            seconds[name] = statistics.median(times)
    finally:
        torch.set_num_threads(threads)
    return seconds


def ray_round_trips(model_dir: Path, repeats: int = 20) -> dict[str, float]:
    """Median seconds of one driver -> actor -> driver call: a no-op, and one carrying the policy's weights."""
    import ray

    from metaopt.posttrain.policy import get_weights, make_policy

    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, value):
            return value

    weights = get_weights(make_policy({"path": str(model_dir)}, 0)[0])
    echo = Echo.remote()
    out = {}
    for name, value in (
        ("no-op", None),
        (f"weights ({sum(t.numel() for t in weights.values()) * 4 / 1e6:.1f} MB)", weights),
    ):
        ray.get(echo.echo.remote(value))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            ray.get(echo.echo.remote(value))
            times.append(time.perf_counter() - started)
        out[name] = statistics.median(times)
    ray.kill(echo)
    return out


_BURN = """
import sys, time, torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
start, n = time.perf_counter(), 0
while time.perf_counter() - start < float(sys.argv[1]):
    for _ in range(20):
        a @ a
    n += 20
print(n / (time.perf_counter() - start))
"""


def parallel_capacity(seconds: float = 3.0) -> float:
    """How many cores two busy single-threaded processes get together right now: the summed speed of two
    concurrent matmul loops over one loop's speed alone (2.0 on an idle 2-core machine). Overlapping rollout
    and learner can gain at most this factor over running them one after the other."""
    import subprocess

    def loops(count: int) -> float:
        procs = [
            subprocess.Popen([sys.executable, "-c", _BURN, str(seconds)], stdout=subprocess.PIPE, text=True)
            for _ in range(count)
        ]
        return sum(float(proc.communicate()[0]) for proc in procs)

    return loops(2) / loops(1)


def report(name: str, repeat: int, result: dict) -> None:
    print(
        f"repeat {repeat + 1}: {name}: {result['completions_per_s']:.1f} completions/s, "
        f"{result['step_s']:.3f} s per step (load {load_text()})",
        flush=True,
    )


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    raw = apply_overrides(section_raw(args), args.extra)
    for mode in args.modes:  # fail on a bad --set, or actors Ray cannot place, before anything slow starts
        check_comparable(build_section(raw, mode, args.colocated_threads), args.ray_cpus, mode)
    common = build_section(raw, "actors")
    check_comparable(common, args.ray_cpus, "actors")
    grpo, model = common.grpo, common.model
    print(
        f"GRPO throughput: tiny {model.arch} hidden {model.hidden} x {model.layers} layers x {model.heads} heads, "
        f"{', '.join(f'{t.name} {t.levels}' for t in common.tasks)}, {grpo.prompts_per_step} prompts x "
        f"G={grpo.group_size} = {grpo.prompts_per_step * grpo.group_size} completions/step, <= "
        f"{grpo.max_new_tokens} new tokens, beta {grpo.beta}, lr {common.optimizer.lr}; "
        f"{args.untimed_steps} untimed + {args.steps} timed steps per run, {args.repeats} repeat(s)",
        flush=True,
    )
    print(f"load average at start: {load_text()}", flush=True)
    capacity = [parallel_capacity()]
    print(f"cores two busy 1-thread processes get together: {capacity[0]:.2f}", flush=True)
    runs: dict[str, list[dict]] = {}
    trl_threads = [] if args.skip_trl else list(args.trl_threads)
    parts: dict[str, float] = {}
    hops: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="grpo_throughput_") as tmp:
        model_dir = Path(tmp) / "policy"
        warm = write_shared_policy(common, model_dir, args)
        if warm:
            print("shared supervised warm-up: " + ", ".join(f"{k} {v:.3g}" for k, v in warm.items()), flush=True)
        if not args.skip_ours:
            import ray

            started = time.perf_counter()
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
            print(f"ray.init: {time.perf_counter() - started:.1f} s", flush=True)
        try:
            for repeat in range(args.repeats):
                for threads in trl_threads:
                    name = f"trl {threads} thread{'s' if threads > 1 else ''}"
                    runs.setdefault(name, []).append(time_trl(common, model_dir, Path(tmp) / "trl", threads, args))
                    report(name, repeat, runs[name][-1])
                for mode in [] if args.skip_ours else args.modes:
                    name = f"ours {mode}"
                    runs.setdefault(name, []).append(time_ours(raw, mode, model_dir, args))
                    report(name, repeat, runs[name][-1])
                if repeat == 0 and len(trl_threads) > 1:  # a thread count far behind the best is not repeated
                    fastest = max(runs[n][0]["completions_per_s"] for n in runs if n.startswith("trl"))
                    trl_threads = [
                        t
                        for t in trl_threads
                        if runs[f"trl {t} thread{'s' if t > 1 else ''}"][0]["completions_per_s"] >= fastest / 2
                    ]
            if not args.skip_ours and not args.no_breakdown:
                parts = breakdown_ours(common, model_dir, args)
                hops = ray_round_trips(model_dir)
        finally:
            if not args.skip_ours:
                ray.shutdown()
    capacity.append(parallel_capacity())
    # Best of the repeats for every side (the same rule for TRL and ours; load only ever slows a run down).
    results = {name: max(rs, key=lambda r: r["completions_per_s"]) for name, rs in runs.items()}

    print()
    print(
        "| side | completions/s (best) | every repeat | mean completion tokens | wall per step (s) | "
        "rollout wait per step (s) |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        wait = "-" if r["wait_s"] != r["wait_s"] else f"{r['wait_s']:.3f}"
        every = " / ".join(f"{x['completions_per_s']:.0f}" for x in runs[name])
        print(f"| {name} | {r['completions_per_s']:.1f} | {every} | {r['tokens']:.2f} | {r['step_s']:.3f} | {wait} |")
    for name, r in results.items():
        if "generate_s" in r:
            print(
                f"{name}: per timed step {r['generate_s']:.3f} s in generate, {r['rollout_s']:.3f} s in "
                f"generate + reference + rewards, {r['step_s'] - r['rollout_s']:.3f} s in the update and the rest"
            )
    if parts:
        print(
            f"parts of our step, in this process, 1 thread ({grpo.prompts_per_step * grpo.group_size} completions): "
            + ", ".join(f"{name} {s:.3f} s" for name, s in parts.items())
        )
    if hops:
        print(
            "Ray actor round trip from the driver (median of 20): "
            + ", ".join(f"{name} {ms * 1e3:.1f} ms" for name, ms in hops.items())
        )
    print(
        f"cores two busy 1-thread processes get together (2.00 = idle 2-core machine): start {capacity[0]:.2f}, "
        f"end {capacity[1]:.2f}"
    )
    print(f"load average at end: {load_text()}")
    headline = f"ours {args.modes[0]}"
    trl = [name for name in results if name.startswith("trl")]
    if trl and headline in results:
        best = max(trl, key=lambda name: results[name]["completions_per_s"])
        peer = results[best]["completions_per_s"]
        for name, r in results.items():
            if not name.startswith("trl"):
                print(f"{name} / {best}: {r['completions_per_s'] / peer:.2f}x")
        for name, r in results.items():
            append("grpo_throughput", f"{name} completions/s", r["completions_per_s"], command_line(argv))
        append("grpo_throughput", "ratio", results[headline]["completions_per_s"] / peer, command_line(argv))
        print(f"ratio: {results[headline]['completions_per_s'] / peer:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
