"""The search's rule on known validation scores: grids, rungs, budgets and who goes on (pure)."""

from __future__ import annotations

import itertools

import pytest

from recipe_runner.search.rungs import (
    Score,
    default_grid,
    keep,
    parse_grid,
    promoted,
    rung_count,
    rung_steps,
    trial_jobs,
    trial_steps,
)


def test_the_default_grid_is_the_recipes_rate_times_powers_of_three():
    assert default_grid(1e-4) == [1.11e-05, 3.33e-05, 1e-4, 3e-4, 9e-4]
    assert default_grid(2e-4, points=3) == [6.67e-05, 2e-4, 6e-4]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("1e-3", "at least two"),
        ("1e-3,0", "above 0 and below 1"),
        ("1e-3,-1e-4", "above 0 and below 1"),
        ("1e-3,1e-3", "named twice"),
        ("1e-3,fast", "like 1e-4"),
    ],
)
def test_a_bad_grid_is_refused_naming_the_fix(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_grid(text)


def test_a_grid_is_sorted():
    assert parse_grid("1e-2, 1e-3,3e-3") == [1e-3, 3e-3, 1e-2]


@pytest.mark.parametrize(
    "trials, eta, rungs, steps",
    [
        (5, 3, 3, [100, 300, 900]),  # 5 -> 2 -> 1
        (3, 3, 2, [300, 900]),  # 3 -> 1
        (5, 2, 4, [112, 225, 450, 900]),  # 5 -> 3 -> 2 -> 1
        (5, 1, 1, [900]),  # no halving: every trial to the full budget
        (1, 3, 1, [900]),
    ],
)
def test_rungs_end_at_the_full_budget_divided_by_eta(trials, eta, rungs, steps):
    assert rung_count(trials, eta) == rungs
    assert rung_steps(900, trials, eta) == steps


def test_the_best_third_goes_on_ties_to_the_lower_validation_loss_then_the_grid_order():
    scores = [
        Score(0, 0.50, 1.0),
        Score(1, 0.70, 0.9),
        Score(2, 0.70, 0.5),
        Score(3, 0.10, 0.1),
        Score(4, 0.2),
    ]
    assert keep(5, 3) == 2 and promoted(scores, 3) == [2, 1]
    assert promoted([Score(3, 0.7, None), Score(1, 0.7, None)], 3) == [1]  # equal in all: the grid's order
    assert promoted(scores[:1], 3) == [0]  # one left goes on
    assert promoted(scores, 1) == [2, 1, 0, 4, 3]  # no halving: all


def test_the_decision_does_not_depend_on_the_order_scores_arrive():
    scores = [
        Score(n, m, v)
        for n, (m, v) in enumerate([(0.3, 1.0), (0.6, 0.8), (0.6, 0.7), (0.1, 0.1), (0.5, 0.2)])
    ]
    decisions = {tuple(promoted(list(order), 3)) for order in itertools.permutations(scores)}
    assert decisions == {(2, 1)}


def test_the_search_costs_five_thirds_of_one_full_run_per_recipe():
    # 5 trials to 100 steps, 2 on to 300, 1 on to 900: 500 + 400 + 600 steps = 1.67 full runs.
    assert trial_steps(900, 5, 3) == 1500
    assert trial_steps(900, 5, 1) == 4500
    assert trial_steps(27, 3, 3) == 3 * 9 + 1 * 18


def test_every_live_trial_is_a_job_at_every_rung():
    # 5 trials at eta 3: 5 jobs to the first rung, 2 to the second, 1 to the full budget
    assert trial_jobs(5, 3) == 8
    assert trial_jobs(5, 1) == 5  # no halving: one job each, to the full budget
    assert trial_jobs(3, 3) == 3 + 1
