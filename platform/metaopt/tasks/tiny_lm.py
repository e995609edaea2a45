"""A tiny causal transformer language model on synthetic text: a second proxy task that is not digits.

The text comes from a fixed random second-order Markov source over a small vocabulary (each pair of previous
tokens allows only ``branching`` next tokens, with random probabilities), so there is structure to learn and
a known entropy floor; nothing is downloaded. Score: next-token accuracy on held-out sequences. Symbolic
optimizer search uses it as its held-out meta-validation task (Chen et al. 2023 validate on tasks unlike the
search proxy); it meets :class:`metaopt.tasks.base.TrainingTask` like the digits MLP.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from metaopt.optim import Schedule, build_optimizer
from metaopt.tasks.base import optimizer_steps
from metaopt.tasks.options import TinyLMOptions


@functools.lru_cache(maxsize=4)
def synthetic_corpus(options: TinyLMOptions) -> dict[str, torch.Tensor]:
    """Train/val token sequences from the seeded second-order Markov source."""
    rng = np.random.default_rng(options.data_seed)
    v, k = options.vocab, options.branching
    allowed = np.stack([rng.choice(v, size=k, replace=False) for _ in range(v * v)])  # [v*v, k]
    probs = rng.dirichlet(np.ones(k), size=v * v)

    def sample(count: int) -> torch.Tensor:
        seqs = np.empty((count, options.seq_len + 1), dtype=np.int64)
        seqs[:, :2] = rng.integers(0, v, size=(count, 2))
        for t in range(2, options.seq_len + 1):
            ctx = seqs[:, t - 2] * v + seqs[:, t - 1]
            pick = (rng.random(count)[:, None] > np.cumsum(probs[ctx], axis=1)).sum(axis=1)
            seqs[:, t] = allowed[ctx, np.minimum(pick, k - 1)]
        return torch.from_numpy(seqs)

    return {"train": sample(options.train_sequences), "val": sample(options.val_sequences)}


class TinyTransformer(nn.Module):
    def __init__(self, options: TinyLMOptions):
        super().__init__()
        self.embed = nn.Embedding(options.vocab, options.d_model)
        self.position = nn.Parameter(torch.randn(options.seq_len, options.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            options.d_model, options.heads, dim_feedforward=2 * options.d_model, dropout=0.0, batch_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, options.layers, enable_nested_tensor=False)
        self.head = nn.Linear(options.d_model, options.vocab)
        self.register_buffer(
            "causal", torch.triu(torch.full((options.seq_len, options.seq_len), float("-inf")), diagonal=1)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        n = tokens.shape[1]
        return self.head(self.blocks(x, mask=self.causal[:n, :n], is_causal=True))


class TinyLMTask:
    """TrainingTask: next-token prediction; score = validation next-token accuracy (higher is better)."""

    metric = "val_accuracy"
    mode = "max"

    def __init__(self, options: dict[str, Any] | TinyLMOptions, optimizer: Any, seed: int):
        from metaopt.tasks import parse_task_options
        from metaopt.tasks.digits import pick_device

        self.options = parse_task_options("tiny_lm", options, "task_options")
        self.device = pick_device(self.options.device)
        self.data = {k: v.to(self.device) for k, v in synthetic_corpus(self.options).items()}
        torch.manual_seed(seed)
        self.model = TinyTransformer(self.options).to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), optimizer)
        self.batch_order = torch.Generator().manual_seed(seed)
        self._step = 0
        self.divergence_loss = 10.0 * math.log(self.options.vocab)

    @property
    def step(self) -> int:
        return self._step

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch[:, :-1])
        targets = batch[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        accuracy = (logits.argmax(-1) == targets).float().mean()
        return loss, accuracy

    def train(self, num_steps: int, lr_at: Schedule) -> dict[str, float]:
        self.model.train()
        train = self.data["train"]

        def next_loss():
            idx = torch.randint(0, len(train), (self.options.batch_size,), generator=self.batch_order)
            return self._loss(train[idx.to(self.device)])[0]

        loss, self._step = optimizer_steps(self.optimizer, num_steps, self._step, lr_at, next_loss)
        return {"loss": loss, **self.evaluate("val")}

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict[str, float]:
        self.model.eval()
        loss, accuracy = self._loss(self.data[split])
        return {f"{split}_loss": loss.item(), f"{split}_accuracy": accuracy.item()}

    def state(self) -> dict[str, Any]:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step": self._step,
            "batch_order": self.batch_order.get_state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._step = int(state["step"])
        self.batch_order.set_state(state["batch_order"])

    def close(self) -> None:
        pass


class TinyLMLossTask(TinyLMTask):
    """The same task scored by validation cross-entropy (lower is better): the target PBT exploits on when a claim
    is stated in validation loss (Jaderberg et al. 2017 rank members by the held-out objective itself)."""

    metric = "val_loss"
    mode = "min"


def val_loss_task(options: dict[str, Any] | TinyLMOptions, optimizer: Any, seed: int) -> TinyLMLossTask:
    """Factory for a section's ``task: metaopt.tasks.tiny_lm:val_loss_task`` (the ``tiny_lm`` options)."""
    return TinyLMLossTask(options, optimizer, seed)
