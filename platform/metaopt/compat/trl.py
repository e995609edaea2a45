"""TRL's private internals, behind one door (written against ``trl==1.16.*``; TRL is a test dependency).

- ``grpo_oracle``: the post-training tests check our GRPO loss (:func:`metaopt.posttrain.grpo.grpo_loss`)
  against TRL's own code path, ``GRPOTrainer._compute_loss``, run on a stand-in trainer whose model forward
  returns our per-token log-probs; the KL and clip fraction come from the trainer's private ``_metrics``.
  There is no plain fallback for an oracle: where TRL's internals are not the ones this module knows, it raises
  :class:`TRLInternalsChanged` with what changed, so the test fails (it does not skip) and someone updates this
  module. On another TRL version whose internals still answer, it says once that it was written for another.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

from metaopt.compat import installed_version, version_matches, warn_fallback

WRITTEN_FOR = "==1.16.*"
"""The TRL versions whose private internals this module uses."""

LOSS_TYPES = {"sequence_mean": "grpo", "token_mean": "bnpo"}
"""Our GRPO aggregation -> the TRL ``loss_type`` that aggregates the same way (Shao et al. 2024, eq. 3; BNPO)."""


class TRLInternalsChanged(AssertionError):
    """TRL's GRPOTrainer internals are not the ones :mod:`metaopt.compat.trl` was written for."""


def _stand_in_trainer(per_token_logps: Any, *, beta: float, epsilon: float, loss_type: str) -> SimpleNamespace:
    """What ``GRPOTrainer._compute_loss`` reads from ``self`` in TRL 1.16, with the model forward replaced by
    ``per_token_logps``, a single process (``accelerator`` gathers/reduces nothing) and nothing optional on."""
    import torch

    single_process = SimpleNamespace(reduce=lambda x, reduction="sum": x, gather=lambda x: x)
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (
            per_token_logps,
            torch.zeros_like(per_token_logps),
            None,
        ),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=False),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"eval": defaultdict(list), "train": defaultdict(list)},
        accelerator=single_process,
    )


def grpo_oracle(
    per_token_logps: Any,
    old_per_token_logps: Any,
    ref_per_token_logps: Any,
    advantages: Any,
    completion_mask: Any,
    *,
    beta: float,
    epsilon: float,
    aggregation: str,
) -> tuple[float, dict[str, float]]:
    """TRL's GRPO loss and its ``kl`` and ``clip_fraction`` (TRL's ``clip_ratio/region_mean``) for these inputs
    (tensors ``[batch, tokens]``, ``advantages`` ``[batch]``). Raises :class:`TRLInternalsChanged` where TRL's
    internals are not the ones this module knows."""
    import torch

    version = installed_version("trl")
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer

        compute_loss = GRPOTrainer._compute_loss
        batch, tokens = completion_mask.shape
        inputs = {
            "prompt_ids": torch.zeros(batch, 2, dtype=torch.long),
            "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
            "completion_ids": torch.zeros(batch, tokens, dtype=torch.long),
            "completion_mask": completion_mask.long(),
            "advantages": advantages,
            "old_per_token_logps": old_per_token_logps,
            "ref_per_token_logps": ref_per_token_logps,
        }
        trainer = _stand_in_trainer(per_token_logps, beta=beta, epsilon=epsilon, loss_type=LOSS_TYPES[aggregation])
        loss = compute_loss(trainer, None, inputs)
        logged = trainer._metrics["eval"]
        metrics = {"kl": float(logged["kl"][0]), "clip_fraction": float(logged["clip_ratio/region_mean"][0])}
    except (ImportError, AttributeError, KeyError, IndexError, TypeError) as err:
        raise TRLInternalsChanged(
            f"TRL {version}'s GRPOTrainer internals changed (metaopt.compat.trl was written for trl{WRITTEN_FOR}): "
            f"{type(err).__name__}: {err}; update metaopt/compat/trl.py to TRL's new _compute_loss"
        ) from err
    if not version_matches("trl", WRITTEN_FOR):
        warn_fallback(
            "trl.grpo_oracle",
            f"metaopt.compat.trl: written for trl{WRITTEN_FOR}, TRL {version}'s GRPOTrainer internals still answered",
        )
    return float(loss.item()), metrics
