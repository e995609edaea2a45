"""Supervised warm-up on demonstrations, and greedy accuracy per category.

GRPO learns only from groups with mixed rewards (Â = 0 when all G completions agree), so a randomly
initialised policy, which never answers correctly, gets no signal at all. DeepSeekMath's GRPO starts from an
instruction-tuned model (Shao et al. 2024, §4); our tiny policies get the same kind of start from a short
teacher-forced warm-up: cross-entropy on ``prompt + demonstration + <eos>``, counted on the completion tokens
only (the prompt is context, not a target).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from metaopt.posttrain.sampling import position_ids, sample_completions
from metaopt.posttrain.tasks import Problem, TaskSet

__all__ = ["demonstration_batch", "evaluate_accuracy", "supervised_warmup"]

_EVAL_ROWS = 256  # greedy evaluation batch: large enough to amortise the per-token forward, small for memory


def demonstration_batch(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], targets: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``prompt + target + <eos>`` rows: (input_ids, attention_mask, target_mask), each [B, L].

    ``target_mask`` is 1 on the target and ``<eos>`` tokens, the ones the warm-up loss counts.
    """
    rows, targets_ids = [], []
    for prompt, target in zip(prompts, targets):
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        target_ids = [*tokenizer.encode(target, add_special_tokens=False), tokenizer.eos_token_id]
        rows.append(prompt_ids + target_ids)
        targets_ids.append(len(target_ids))
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, n_target) in enumerate(zip(rows, targets_ids)):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
        target_mask[i, width - n_target :] = 1
    return input_ids, attention_mask, target_mask


def _completion_loss(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (teacher forcing)."""
    logits = (
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        )
        .logits[:, :-1]
        .float()
    )
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    weights = target_mask[:, 1:].to(nll.dtype)
    return (nll * weights).sum() / weights.sum()


def _sample_problems(taskset: TaskSet, categories: list[str], count: int, rng: np.random.Generator) -> list[Problem]:
    picks = rng.integers(len(categories), size=count)
    return [taskset.sample(categories[int(i)], rng) for i in picks]


def supervised_warmup(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    taskset: TaskSet,
    categories: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """``steps`` AdamW steps of teacher-forced cross-entropy on demonstrations from ``categories``.

    Each step draws ``batch_size`` problems, categories uniformly, from a generator seeded with ``seed``.
    ``progress(step, loss)`` is called after every step. Returns ``loss`` (mean of the last 10 steps),
    ``initial_loss`` (the first step) and ``steps``.
    """
    if steps <= 0:
        return {"steps": 0.0}
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        for step in range(steps):
            problems = _sample_problems(taskset, categories, batch_size, rng)
            batch = demonstration_batch(
                tokenizer, [p.prompt for p in problems], [taskset.demonstration(p) for p in problems]
            )
            loss = _completion_loss(model, *(t.to(device) for t in batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, losses[-1])
    finally:
        model.train(was_training)
    return {"loss": float(np.mean(losses[-10:])), "initial_loss": losses[0], "steps": float(steps)}


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    taskset: TaskSet,
    categories: list[str],
    per_category: int,
    seed: int,
    max_new_tokens: int = 8,
) -> dict[str, float]:
    """Greedy accuracy on ``per_category`` fresh problems of each category: ``{category: fraction correct}``.

    Problems come from a generator seeded with ``seed`` (the same problems for the same seed); decoding is
    batched across categories.
    """
    rng = np.random.default_rng(seed)
    problems = [taskset.sample(category, rng) for category in categories for _ in range(per_category)]
    texts: list[str] = []
    for start in range(0, len(problems), _EVAL_ROWS):
        chunk = problems[start : start + _EVAL_ROWS]
        batch = sample_completions(model, tokenizer, [p.prompt for p in chunk], 1, max_new_tokens, 0.0, seed)
        texts += batch.completions
    correct: dict[str, list[float]] = {category: [] for category in categories}
    for problem, text in zip(problems, texts):
        correct[problem.category].append(taskset.reward(problem, text))
    return {category: float(np.mean(values)) for category, values in correct.items()}
