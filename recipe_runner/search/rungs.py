"""The learning-rate search's plan and its one rule, pure: each recipe's grid, the rungs of successive
halving, and which trials of a rung go on.

Synchronous successive halving over a small fixed grid: every trial of a recipe trains to the first rung
(the full budget / eta^(rungs-1) steps), is scored on the validation split, and the best ceil(n / eta) go on
from their checkpoint to the next rung, until one trial reaches the full budget. Each recipe competes on its
own, with the same number of trials and the same budget as every other recipe. `eta` 1: no halving, every
trial trains to the full budget.

Why not Optuna's SuccessiveHalvingPruner: it is asynchronous (ASHA). A trial's fate depends on the order in
which trials ask `should_prune`, the first to ask always goes on, asking twice changes the answer, and it
cannot break ties by validation loss nor run eta 1; over the 120 orders of five trials it promoted 16
different sets. Optuna keeps the study (search.py); this module holds the rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_HALVING = 3
DEFAULT_POINTS = 5  # the default grid: the recipe's own rate x 3^k, k = -2..2
GRID_FACTOR = 3.0


@dataclass(frozen=True)
class Score:
    """One trial's result at a rung: higher `metric` is better; ties go to the lower validation loss."""

    trial: int
    metric: float
    val_loss: float | None = None


def default_grid(rate: float, points: int = DEFAULT_POINTS, factor: float = GRID_FACTOR) -> list[float]:
    """The recipe's own rate times factor^k for k centred on 0: 5 points span 3^-2 .. 3^2."""
    half = points // 2
    return [float(f"{rate * factor**k:.3g}") for k in range(-half, points - half)]


def parse_grid(text: str) -> list[float]:
    """The rates of --lr-grid V1,V2,...: at least two, each above 0, none twice; ValueError naming the fix."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--lr-grid {text!r}: give learning rates like 1e-4,3e-4,1e-3") from None
    if len(rates) < 2:
        raise ValueError(f"--lr-grid {text!r}: give at least two rates to compare, like 1e-4,3e-4")
    if min(rates) <= 0 or max(rates) >= 1:
        raise ValueError(f"--lr-grid {text!r}: every rate must be above 0 and below 1")
    if len(set(rates)) != len(rates):
        raise ValueError(f"--lr-grid {text!r}: a rate is named twice")
    return sorted(rates)


def keep(count: int, eta: int) -> int:
    """How many of `count` scored trials go on to the next rung: the best third (eta 3), at least one."""
    return count if eta <= 1 else max(1, math.ceil(count / eta))


def rung_count(trials: int, eta: int) -> int:
    """Rungs until one trial is left: 5 trials at eta 3 go 5 -> 2 -> 1, three rungs."""
    rungs, alive = 1, trials
    while eta > 1 and alive > 1:
        alive, rungs = keep(alive, eta), rungs + 1
    return rungs


def rung_steps(full_steps: int, trials: int, eta: int) -> list[int]:
    """The optimizer step each rung ends at: the full budget / eta^(rungs-1), ... , the full budget."""
    rungs = rung_count(trials, eta)
    return [max(1, full_steps // eta ** (rungs - 1 - k)) for k in range(rungs)]


def promoted(scores: Sequence[Score], eta: int) -> list[int]:
    """The trials that go on: the best keep(n, eta) by metric, ties by lower validation loss, then by the
    trial's number (the grid's order). Failed trials are not given here."""
    ranked = sorted(
        scores,
        key=lambda s: (-s.metric, math.inf if s.val_loss is None else s.val_loss, s.trial),
    )
    return [s.trial for s in ranked[: keep(len(ranked), eta)]]


def trial_steps(full_steps: int, trials: int, eta: int) -> int:
    """Optimizer steps one recipe's search trains in all (each rung continues from the last): the cost."""
    steps = rung_steps(full_steps, trials, eta)
    alive, total, done = trials, 0, 0
    for step in steps:
        total += alive * (step - done)
        done, alive = step, keep(alive, eta)
    return total


def trial_jobs(trials: int, eta: int) -> int:
    """Jobs one recipe's search starts before its test scoring: one for each live trial at each rung (5 trials
    at eta 3: 5 + 2 + 1). Each pays a job's fixed cost (its start, its model, its validation scoring)."""
    alive, jobs = trials, 0
    for _ in range(rung_count(trials, eta)):
        jobs += alive
        alive = keep(alive, eta)
    return jobs
