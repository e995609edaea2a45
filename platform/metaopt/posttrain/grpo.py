"""Group Relative Policy Optimization (GRPO; Shao et al. 2024, "DeepSeekMath", §4.1), in plain torch.

For each prompt q the policy samples a group of G completions o_1..o_G with rewards r_1..r_G. GRPO drops the
value network of PPO and uses the group as the baseline (outcome supervision, §4.1.2):

    Â_i = (r_i − mean(r)) / (std(r) + ε)                                       (group_advantages)

and maximises the clipped surrogate with a KL penalty to a frozen reference policy (Eq. 3):

    J = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ_it Â_i, clip(ρ_it, 1 − ε_c, 1 + ε_c) Â_i) − β·D_KL,it ],
    ρ_it = π_θ(o_it | q, o_i,<t) / π_θold(o_it | q, o_i,<t),

with the per-token KL estimated by the non-negative, unbiased "k3" estimator (Eq. 4)

    D_KL,it = π_ref/π_θ − log(π_ref/π_θ) − 1.

:func:`grpo_loss` returns −J. :class:`GRPOLearner` applies it for μ optimizer passes over each batch
(``updates_per_batch``), with π_θold fixed to the policy that sampled the batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from metaopt.errors import ConfigError
from metaopt.optim import build_optimizer, build_schedule, set_learning_rate
from metaopt.posttrain.sampling import RolloutBatch, position_ids

__all__ = [
    "LOSS_AGGREGATIONS",
    "GRPOLearner",
    "batch_logprobs",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "token_logprobs",
]

LOSS_AGGREGATIONS = ("sequence_mean", "token_mean")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Â_i = (r_i − mean_group(r)) / (std_group(r) + eps), for rewards laid out as N consecutive groups of G.

    ``std`` is the *unbiased* (Bessel-corrected, divide by G − 1) standard deviation, as in TRL's
    ``GRPOTrainer`` (its ``nanstd``), with TRL's ε = 1e-4. ``scale=False`` keeps only the mean baseline
    (Dr. GRPO, Liu et al. 2025, drops the std division). A group whose rewards are all equal gets Â = 0.
    """
    if group_size < 2:
        raise ConfigError("posttrain.group_size", f"GRPO needs at least 2 completions per prompt, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().reshape(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centred.reshape(rewards.shape)


def token_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    *,
    group_size: int = 1,
) -> torch.Tensor:
    """log π(x_t | x_<t) at temperature T for the last ``logits_to_keep`` tokens of each row: [B, T].

    Positions follow the attention mask, as in sampling, so left padding does not shift them. ``temperature``
    0 (greedy sampling) means untempered. Differentiable: the learner backpropagates through it.

    With ``group_size`` G > 1, rows ``i*G .. i*G+G-1`` are expected to share their first
    ``L - logits_to_keep`` columns (the prompt, as in a :class:`RolloutBatch`). When they do — checked on the
    tensors, so a wrong G can only cost speed, never correctness — each prompt is run once and its KV cache
    repeated G times for the completion tokens (:func:`_shared_prompt_logits`). Otherwise (G = 1, rows that
    do not group, gradient checkpointing, which turns the cache off) one full forward, computing only the
    ``logits_to_keep + 1`` last positions' logits (the last predicts nothing and is dropped).
    """
    prompt_length = input_ids.shape[1] - logits_to_keep
    if _prompts_shared(input_ids, attention_mask, prompt_length, group_size) and not _checkpointing(model):
        logits = _shared_prompt_logits(model, input_ids, attention_mask, prompt_length, group_size)
    else:
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            logits_to_keep=logits_to_keep + 1,
            use_cache=False,
        ).logits[:, :-1]
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    targets = input_ids[:, prompt_length:]
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def batch_logprobs(model: PreTrainedModel, batch: RolloutBatch, group_size: int | None = None) -> torch.Tensor:
    """:func:`token_logprobs` of a batch's completion tokens at its sampling temperature: [N*G, T].

    Each prompt is run once per group of ``group_size`` rows (default: the batch's ``group_size``) when its
    rows share it, as the sampler's rows do; a minibatch from :meth:`RolloutBatch.select` has ``group_size``
    1, so pass the parent batch's G for one whose rows are whole groups.
    """
    return token_logprobs(
        model,
        batch.input_ids,
        batch.attention_mask,
        batch.completion_mask.shape[1],
        batch.temperature,
        group_size=batch.group_size if group_size is None else group_size,
    )


def _prompts_shared(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, group_size: int) -> bool:
    """Whether rows come in consecutive groups of ``group_size`` > 1 with identical prompt ids and mask."""
    rows = input_ids.shape[0]
    if group_size < 2 or rows % group_size or prompt_length < 1 or prompt_length >= input_ids.shape[1]:
        return False
    grouped = [
        t[:, :prompt_length].reshape(rows // group_size, group_size, prompt_length) for t in (input_ids, attention_mask)
    ]
    return all(bool((g == g[:, :1]).all()) for g in grouped)


def _checkpointing(model: PreTrainedModel) -> bool:
    """Gradient checkpointing in training disables the KV cache, which the shared-prompt path needs."""
    if not (model.training and torch.is_grad_enabled()):
        return False
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def _shared_prompt_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    group_size: int,
) -> torch.Tensor:
    """Logits predicting the completion tokens (columns ``prompt_length ..``), each group's prompt run once.

    Pass 1 runs one row per group (rows 0, G, 2G, …) over the prompt columns into a fresh ``DynamicCache``;
    its last position predicts the first completion token. The cache's keys and values are then repeated G
    times along the batch (``repeat_interleave``, whose backward sums the G rows' gradients into the shared
    prompt), and pass 2 runs the completion tokens but the last (which predicts nothing) against it, with
    the full attention mask and mask-derived positions — the same attention as one full forward.
    """
    positions = position_ids(attention_mask)
    cache = DynamicCache(config=model.config)
    first = model(
        input_ids=input_ids[::group_size, :prompt_length],
        attention_mask=attention_mask[::group_size, :prompt_length],
        position_ids=positions[::group_size, :prompt_length],
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits.repeat_interleave(group_size, dim=0)
    if input_ids.shape[1] - prompt_length == 1:
        return first
    cache.batch_repeat_interleave(group_size)
    rest = model(
        input_ids=input_ids[:, prompt_length:-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=positions[:, prompt_length:-1],
        cache=cache,
        use_cache=True,
    ).logits
    return torch.cat([first, rest], dim=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref) (Shao et al. 2024, Eq. 4): e^(ref−logp) − (ref−logp) − 1 ≥ 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    aggregation: str = "sequence_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """−J of Eq. 3 (Shao et al. 2024) for per-token log-probs [B, T] and per-sequence advantages [B].

    Per token: ℓ_t = −min(ρ_t Â, clip(ρ_t, 1 − ε, 1 + ε) Â) + β·k3_t, with ρ_t = exp(logp − old_logp)
    (``old_logp`` None means on-policy: old = logp detached, ρ = 1 with the policy gradient intact).
    ``aggregation``:

    * ``"sequence_mean"`` (default; Eq. 3 and TRL's ``loss_type="grpo"``): mean over each completion's
      tokens, then mean over completions;
    * ``"token_mean"`` (DAPO, Yu et al. 2025; TRL's ``"bnpo"``/``"dapo"`` on one batch): mean over all
      completion tokens of the batch, so long completions weigh more.

    The KL term is used when ``ref_logp`` is given and ``beta != 0``. Metrics (masked token means over the
    batch, as TRL logs them): ``kl`` (0 without a reference), ``clip_fraction`` (tokens where the clip is
    active: ρ < 1 − ε with Â < 0, or ρ > 1 + ε with Â > 0), ``ratio_mean``.
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ConfigError(
            "posttrain.grpo.loss_aggregation", f"must be one of {', '.join(LOSS_AGGREGATIONS)}, got {aggregation!r}"
        )
    mask = completion_mask.to(logp.dtype)
    old_logp = logp.detach() if old_logp is None else old_logp
    adv = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else None
    if kl is not None and beta != 0.0:
        per_token = per_token + beta * kl
    if aggregation == "sequence_mean":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    else:
        loss = _masked_mean(per_token, mask)
    with torch.no_grad():
        clip_active = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + clip_eps) & (adv > 0))
        metrics = {
            "kl": _masked_mean(kl, mask).item() if kl is not None else 0.0,
            "clip_fraction": _masked_mean(clip_active.to(mask.dtype), mask).item(),
            "ratio_mean": _masked_mean(ratio, mask).item(),
        }
    return loss, metrics


class GRPOLearner:
    """The optimizer side of GRPO: μ clipped-surrogate passes over each rollout batch.

    ``GRPOLearner(policy, reference=None, *, optimizer_spec, schedule_spec=None, ...)``. ``optimizer_spec`` goes
    to :func:`metaopt.optim.build_optimizer`; ``schedule_spec`` (optional) to :func:`metaopt.optim.build_schedule`,
    evaluated at every optimizer step (counted over the learner's life).
    Per :meth:`step`:

    1. π_θold log-probs: the batch's sampling log-probs when present (the behaviour policy, also right when
       rollout workers lag the learner); else one no-grad forward before the first update — or, with a single
       optimizer step per batch, the current log-probs detached (ρ ≡ 1).
    2. Reference log-probs when β ≠ 0: the batch's ``ref_logprobs`` if a worker filled them in, else one
       no-grad forward of ``reference`` (if given); with neither, there is no KL term.
    3. ``updates_per_batch`` passes over the batch, each in minibatches of ``minibatch_size`` rows (all rows
       when None), one optimizer step per minibatch, gradients clipped to ``max_grad_norm`` (None: no clip).

    Log-probs are taken at the batch's sampling temperature, so ρ = 1 exactly before the first update, by
    :func:`batch_logprobs`: each prompt is run once per group of G rows, also in minibatches of whole groups
    (``minibatch_size`` a multiple of G); other minibatches take one full forward.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        reference: PreTrainedModel | None = None,
        *,
        optimizer_spec: dict[str, Any],
        schedule_spec: dict[str, Any] | None = None,
        clip_eps: float = 0.2,
        beta: float = 0.04,
        updates_per_batch: int = 1,
        minibatch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        aggregation: str = "sequence_mean",
    ):
        if updates_per_batch < 1:
            raise ConfigError("posttrain.grpo.updates_per_batch", f"must be an integer >= 1, got {updates_per_batch!r}")
        if minibatch_size is not None and minibatch_size < 1:
            raise ConfigError(
                "posttrain.grpo.minibatch_size", f"must be an integer >= 1 or null, got {minibatch_size!r}"
            )
        if not clip_eps > 0:
            raise ConfigError("posttrain.grpo.clip_eps", f"must be > 0, got {clip_eps!r}")
        if not beta >= 0:
            raise ConfigError("posttrain.grpo.beta", f"must be >= 0, got {beta!r}")
        if aggregation not in LOSS_AGGREGATIONS:
            raise ConfigError(
                "posttrain.grpo.loss_aggregation", f"must be one of {', '.join(LOSS_AGGREGATIONS)}, got {aggregation!r}"
            )
        self.policy = policy.train()
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.optimizer = build_optimizer(policy.parameters(), optimizer_spec)
        self.schedule = build_schedule(schedule_spec) if schedule_spec is not None else None
        self.clip_eps, self.beta = clip_eps, beta
        self.updates_per_batch, self.minibatch_size = updates_per_batch, minibatch_size
        self.max_grad_norm, self.aggregation = max_grad_norm, aggregation
        self.optimizer_steps = 0

    def _minibatches(self, rows: int) -> list[torch.Tensor]:
        size = self.minibatch_size or rows
        return [torch.arange(start, min(start + size, rows)) for start in range(0, rows, size)]

    def step(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict[str, float]:
        """Optimize on one batch; returns metrics averaged over its optimizer steps (``lr``: the last used)."""
        device = next(self.policy.parameters()).device
        advantages = advantages.to(device)
        minibatches = self._minibatches(len(batch))
        single_step = self.updates_per_batch == 1 and len(minibatches) == 1
        old_logp = batch.old_logprobs
        if old_logp is None and not single_step:
            with torch.no_grad():
                old_logp = batch_logprobs(self.policy, batch)
        ref_logp = batch.ref_logprobs if self.beta != 0.0 else None
        if ref_logp is None and self.reference is not None and self.beta != 0.0:
            with torch.no_grad():
                ref_logp = batch_logprobs(self.reference, batch)
        totals: dict[str, float] = {}
        lr = self.optimizer.param_groups[0]["lr"]
        for _ in range(self.updates_per_batch):
            for rows in minibatches:
                if self.schedule is not None:
                    lr = self.schedule(self.optimizer_steps)
                    set_learning_rate(self.optimizer, lr)
                part = batch.select(rows)
                logp = batch_logprobs(self.policy, part, batch.group_size)  # whole groups iff aligned
                loss, metrics = grpo_loss(
                    logp,
                    None if old_logp is None else old_logp[rows],
                    None if ref_logp is None else ref_logp[rows],
                    advantages[rows],
                    part.completion_mask,
                    clip_eps=self.clip_eps,
                    beta=self.beta,
                    aggregation=self.aggregation,
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                max_norm = self.max_grad_norm if self.max_grad_norm is not None else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
                self.optimizer.step()
                self.optimizer_steps += 1
                for key, value in {"loss": loss.item(), "grad_norm": grad_norm.item(), **metrics}.items():
                    totals[key] = totals.get(key, 0.0) + value
        count = self.updates_per_batch * len(minibatches)
        averages = {key: value / count for key, value in totals.items()}
        return {**averages, "lr": float(lr), "optimizer_steps": float(count)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_steps": self.optimizer_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer_steps = int(state["optimizer_steps"])
