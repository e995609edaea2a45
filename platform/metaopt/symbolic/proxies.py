"""Scoring a program: train a proxy task with it as the optimizer; score = the task's validation metric.

Chen et al. 2023 (Sec. 3.1) score each program on small proxy tasks after a fixed number of steps and try a
few learning rates, since a program's constants set its scale. Here a proxy is a metaopt task (digits MLP,
tiny transformer LM) trained with ``{"name": "program", "program": ...}`` as its optimizer spec; the score
is the mean over seeds of the final validation metric at the best lr. A program whose training diverges
(non-finite or exploding loss) scores ``-inf`` at that lr, and so does one whose outputs are non-finite by its
own fault at any step (the paper discards such programs): the proxy trains under
:func:`metaopt.symbolic.export.raise_on_nonfinite`, so the interpreter's guard -- which zeroes non-finite
entries -- cannot pass off an always-NaN program as one that merely makes no updates. :class:`RayScorer` scores a
batch of programs as parallel Ray tasks; :class:`LocalScorer` in the calling process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from metaopt.symbolic.program import Program


@dataclass(frozen=True)
class ProgramScore:
    score: float  # higher is better; -inf when every lr diverged or raised
    best_lr: float
    per_lr: tuple[float, ...]
    failure: str | None = None  # why a program scored -inf (diverged / non-finite / the exception), else None


def score_program(program_json: str, proxy: dict[str, Any]) -> ProgramScore:
    """Train ``proxy['task']`` with the program at each lr; mean over seeds, max over lrs.

    A program that raises, produces NaN or inf (at any step) or diverges scores ``-inf`` at that lr with the
    reason recorded (e.g. ``lr 0.001: non-finite update at step 3``): a bad program is a failed candidate, never
    a crashed search. The other seeds of a failed lr are not trained: their mean is ``-inf`` already."""
    import torch

    torch.set_num_threads(1)  # scores must not depend on how many scorers share the machine
    per_lr, failures = [], []
    for lr in proxy["lrs"]:
        values = []
        for seed in range(proxy["seeds"]):
            value, failure = train_once(program_json, proxy, lr, seed)
            values.append(value)
            if failure is not None:
                failures.append(f"lr {lr:g}: {failure}")
                break
        per_lr.append(sum(values) / len(values))
    best = max(range(len(per_lr)), key=lambda i: per_lr[i])
    failed = not math.isfinite(per_lr[best])
    return ProgramScore(per_lr[best], float(proxy["lrs"][best]), tuple(per_lr), "; ".join(failures) if failed else None)


def train_once(program_json: str, proxy: dict[str, Any], lr: float, seed: int) -> tuple[float, str | None]:
    """One proxy training at ``lr``: ``(score, None)`` (higher is better), or ``(-inf, why it failed)``."""
    from metaopt.errors import ConfigError
    from metaopt.symbolic.export import NonFiniteProgramError, raise_on_nonfinite
    from metaopt.tasks import build_task

    try:
        task = build_task(proxy["task"], proxy["task_options"], {"name": "program", "program": program_json}, seed)
        with raise_on_nonfinite():  # the guard would zero NaN/inf outputs and hide the failure
            metrics = task.train(proxy["steps"], lambda _step: lr)
    except NonFiniteProgramError as err:
        return -math.inf, str(err)
    except ConfigError as err:
        if err.field == "task":  # the proxy's own task cannot be built (the user's factory failed): that fails the
            raise  # search in one line, instead of scoring every program -inf
        return -math.inf, f"raised ConfigError: {str(err).splitlines()[0] if str(err) else ''}"
    except Exception as err:  # any error of a candidate program is its failure
        return -math.inf, f"raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    value = float(metrics.get(task.metric, math.nan))
    loss = float(metrics.get("loss", math.nan))
    limit = getattr(task, "divergence_loss", None)
    if not math.isfinite(loss) or not math.isfinite(value):
        return -math.inf, f"non-finite loss or {task.metric}"
    if limit is not None and loss > limit:
        return -math.inf, f"diverged (loss {loss:.3g} > {limit:.3g})"
    return (value if task.mode == "max" else -value), None


class LocalScorer:
    """Scores programs one after another in this process."""

    def score(self, programs: list[Program], proxy: dict[str, Any]) -> list[ProgramScore]:
        return [score_program(p.to_json(), proxy) for p in programs]

    def close(self) -> None:
        pass


class RayScorer:
    """Scores a batch of programs as parallel Ray tasks (placed in the calling trial's placement group)."""

    def __init__(self, cpus: float = 1.0, gpus: float = 0.0):
        import ray

        self._remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(score_program)

    def score(self, programs: list[Program], proxy: dict[str, Any]) -> list[ProgramScore]:
        import ray

        return ray.get([self._remote.remote(p.to_json(), proxy) for p in programs])

    def close(self) -> None:
        pass
