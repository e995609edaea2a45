"""Rebuild the learning rate every PBT trial actually trained with, following its lineage.

PBT (Jaderberg et al. 2017) lets a weak trial *exploit* a strong one: it copies the strong trial's
checkpoint at iteration ``k`` and continues with a perturbed config. So the model a final trial holds was
trained by a chain of ancestors, each for a segment of steps, each with its own learning rate. Its schedule
is ``lr(step)`` along that chain, not the lr the trial itself started with.

Ray Tune logs each exploit as a JSON line in ``pbt_global.txt``:
``[target_tag, clone_tag, target_iteration, clone_iteration, clone_config, new_config]``.
Replaying those events in order over per-trial histories gives every trial's schedule::

    history[target] = history[clone] cut at the checkpoint's step k + [(k, new_lr)]

One subtlety: the iterations in the log line are each trial's *last seen* result, and the checkpoint Tune
actually copies may be older (asynchronous PBT) or even newer (a clone still running when the save resolves).
The step actually resumed from is visible in the *target's* own results: the first row it
reports after the exploit is one iteration past the checkpoint (:func:`resume_steps`). The trainable
also carries its lineage inside its checkpoints; the sweep cross-checks the two and the tests demand equality.

Under PB2 a config holds the searched ``log_lr`` = log10(lr) beside ``lr``; :func:`config_lr` resolves the lr a
config trains with, so every schedule here is in real learning rates.

All functions here are pure; a schedule is a list of ``(start_step, lr)`` segments sorted by start.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaopt.optim import Schedule, constant, cosine

Segments = list[tuple[int, float]]

#: The config key PB2 searches: log10 of the learning rate (Parker-Holder et al. 2020 search a box the GP normalises
#: linearly; on log10(lr) its proposals spread over the decades of [lr_min, lr_max] instead of piling up at the top).
LOG_LR_KEY = "log_lr"


def config_lr(config: dict[str, Any]) -> float:
    """The learning rate a trial config trains with: ``10 ** log_lr`` where the config holds PB2's ``log_lr`` (it
    wins over a ``lr`` Tune may have copied from the clone), else ``lr``.

    PB2 keeps ``log_lr`` inside ``[log10 lr_min, log10 lr_max]``, but ``10 ** log10(0.2)`` is 0.20000000000000004:
    where the config holds its section (``exp``, as every trial config and policy-log line does), the lr is clipped
    to ``[lr_min, lr_max]`` so that last-digit rounding never leaves the searched range.
    """
    if LOG_LR_KEY not in config:
        return float(config["lr"])
    lr = float(10.0 ** float(config[LOG_LR_KEY]))
    section = config.get("exp")
    if isinstance(section, dict) and "lr_min" in section and "lr_max" in section:
        lr = min(max(lr, float(section["lr_min"])), float(section["lr_max"]))
    return lr


@dataclass(frozen=True)
class ExploitEvent:
    """One line of Tune's ``pbt_global.txt``."""

    target: str
    clone: str
    target_iteration: int
    clone_iteration: int
    new_config: dict[str, Any]
    resumed_step: int | None = None  # filled from the target's results by resume_steps


def read_pbt_global(path: str | Path) -> list[ExploitEvent]:
    """Parse ``pbt_global.txt`` (chronological); a missing file means no exploit happened."""
    path = Path(path)
    if not path.exists():
        return []
    events = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            target, clone, target_iter, clone_iter, _clone_config, new_config = json.loads(line)
        except (json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"{path}: line {number} is not a PBT policy record ({err})") from None
        events.append(ExploitEvent(str(target), str(clone), int(target_iter), int(clone_iter), new_config))
    return events


def trial_schedule(lr: float, lr_schedule: str, budget_steps: int) -> Schedule:
    """The ``step -> lr`` a trial trains with, from the lr its config holds.

    ``constant``: ``lr`` at every step (PBT/PB2 change it between iterations through the config). ``cosine``:
    ``lr_t = lr * (1 + cos(pi * t / T)) / 2`` with ``T = budget_steps`` (Loshchilov & Hutter 2017, SGDR, one cycle
    without restart; :func:`metaopt.optim.cosine`, equal to ``optax.cosine_decay_schedule(lr, T)``).
    """
    return cosine(lr, budget_steps) if lr_schedule == "cosine" else constant(lr)


def same_lr(a: float, b: float) -> bool:
    """Equal up to the last digits a CSV/JSON round-trip may change."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def same_schedule(a: Segments, b: Segments) -> bool:
    return len(a) == len(b) and all(sa == sb and same_lr(la, lb) for (sa, la), (sb, lb) in zip(a, b))


def record_lr(history: Segments, step: int, lr: float) -> Segments:
    """Append ``lr`` from ``step`` on; a change at the same step replaces it, an unchanged lr is not repeated."""
    kept = [(s, v) for s, v in history if s < step]
    if kept and kept[-1][1] == lr:
        return kept
    return [*kept, (int(step), float(lr))]


def cut(history: Segments, step: int) -> Segments:
    """The part of a schedule that applies before ``step``."""
    return [(s, v) for s, v in history if s < step]


def resume_steps(
    events: list[ExploitEvent],
    reported: dict[str, list[tuple[int, float]]],
    steps_per_iteration: int,
    boundary_steps: int | None = None,
) -> list[ExploitEvent]:
    """Attach to each exploit the optimizer step its target resumed from, read off the target's result rows.

    ``reported[tag]`` lists ``(step, lr)`` of every result the trial reported, in order, where ``step`` is
    the optimizer-step count after that iteration. After an exploit the target's next result is the first
    one with the exploit's new lr, reported ``steps_per_iteration`` steps after the copied checkpoint.
    Steps, not Tune's iteration counter: Tune may restore a *later* checkpoint of the clone than the
    iteration it records (seen with Ray 2.60 when the clone is still running), and the optimizer-step
    count travels inside the checkpoint while the iteration counter does not.

    An exploit that keeps the target's lr leaves no lr change in its rows: the restore shows as a row whose step
    does not follow the previous one. If the clone's checkpoint sits at the very step the target had reached,
    not even that: the checkpoint is then the one PBT saved at a perturbation boundary (every
    ``boundary_steps`` optimizer steps), at the target's logged iteration or the one after it (Tune logs the
    target's result *before* the one being processed).
    """
    cursor = dict.fromkeys(reported, 0)
    resolved = []
    for index, event in enumerate(events):
        rows = reported.get(event.target)
        if rows is None:
            raise ValueError(f"no results for exploited trial {event.target!r}")
        new_lr = config_lr(event.new_config)
        p = cursor[event.target]
        current = rows[p - 1] if p > 0 else rows[0] if rows else None
        if current is not None and same_lr(current[1], new_lr):
            # The explore step kept the target's own lr (clipped to a bound, PB2, a factor of 1): no lr change
            # marks the restore, the steps do.
            p = _unchanged_lr_resume(event, rows, p, new_lr, steps_per_iteration, boundary_steps)
        else:
            while p < len(rows) and not (same_lr(rows[p][1], new_lr) and not (p and same_lr(rows[p - 1][1], new_lr))):
                p += 1
        if p >= len(rows) and any(later.target == event.target for later in events[index + 1 :]):
            # Exploited again before it trained a single iteration: the later exploit overwrote this one.
            continue
        if p >= len(rows):
            raise ValueError(
                f"trial {event.target!r} exploited {event.clone!r} (new lr {new_lr:g}) but never reported with it"
            )
        cursor[event.target] = p + 1
        resolved.append(
            ExploitEvent(
                event.target,
                event.clone,
                event.target_iteration,
                event.clone_iteration,
                event.new_config,
                resumed_step=rows[p][0] - steps_per_iteration,
            )
        )
    return resolved


def _unchanged_lr_resume(
    event: ExploitEvent,
    rows: list[tuple[int, float]],
    start: int,
    lr: float,
    steps_per_iteration: int,
    boundary_steps: int | None,
) -> int:
    """Index of the target's first row after an exploit that kept its lr (see :func:`resume_steps`); ``len(rows)``
    when it never reported again."""
    p = max(start, 1)
    while p < len(rows) and same_lr(rows[p][1], lr):
        if rows[p][0] != rows[p - 1][0] + steps_per_iteration:
            return p  # a restore: the step count jumped to the checkpoint's + one iteration
        p += 1
    for iteration in (event.target_iteration, event.target_iteration + 1):
        step = iteration * steps_per_iteration
        if boundary_steps and step % boundary_steps:
            continue
        for q in range(start, len(rows) - 1):
            if rows[q][0] == step and same_lr(rows[q + 1][1], lr):
                return q + 1
    return len(rows)


def replay_events(initial_lrs: dict[str, float], events: list[ExploitEvent]) -> dict[str, Segments]:
    """Every trial's lineage schedule (in optimizer steps) after applying the exploit events in order.

    Events must carry ``resumed_step`` (see :func:`resume_steps`).
    """
    histories: dict[str, Segments] = {tag: [(0, float(lr))] for tag, lr in initial_lrs.items()}
    for event in events:
        if event.clone not in histories:
            raise ValueError(f"exploit event clones unknown trial {event.clone!r}; known: {sorted(histories)}")
        if event.resumed_step is None:
            raise ValueError(f"exploit of {event.clone!r} by {event.target!r} has no resumed step")
        step = event.resumed_step
        histories[event.target] = record_lr(cut(histories[event.clone], step), step, config_lr(event.new_config))
    return histories


def lr_at_steps(history: Segments, total_steps: int) -> list[float]:
    """Dense view of a schedule: the lr used at every step ``0 .. total_steps-1``."""
    out, index = [], 0
    for step in range(total_steps):
        while index + 1 < len(history) and history[index + 1][0] <= step:
            index += 1
        out.append(history[index][1])
    return out


def describe(history: Segments) -> str:
    """``0:0.1 -> 400:0.12 -> 800:0.096`` — a schedule on one line for terminals and logs."""
    return " -> ".join(f"{s}:{lr:.3g}" for s, lr in history)
