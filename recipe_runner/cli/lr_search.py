"""`--lr-search` of `recipe-run launch` and `plan`: its flags and checks, the search's settings from them,
its cost before anything starts, and the searched launch (recipe_runner/search/ runs it).

    recipe-run --recipes all --lr-search                               # each recipe's rate x 3^k, k=-2..2
    recipe-run --recipes r1,r4 --lr-search --lr-grid 1e-3,3e-3,1e-2 --max-steps 27
    recipe-run plan --recipes all --lr-search                          # trials, rungs, GPU-hours, makespan
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from recipe_runner.backends.base import Backend
from recipe_runner.backends.loop import RunPolicy
from recipe_runner.cli.common import UsageError, print_rows, report_or_say
from recipe_runner.planning.estimates import rank_batch
from recipe_runner.planning.makespan import TimedJob, fixed_seconds, predict_makespan
from recipe_runner.planning.placement import GpuRoom, Plan
from recipe_runner.planning.request import LaunchRequest
from recipe_runner.results.live import LiveReporter, PlainReporter
from recipe_runner.results.summary import JobResult, read_summary, render_summary
from recipe_runner.search.run import SearchLaunch, SearchSetup, run_search
from recipe_runner.search.rungs import (
    DEFAULT_HALVING,
    default_grid,
    keep,
    parse_grid,
    rung_steps,
    trial_jobs,
    trial_steps,
)
from recipe_runner.search.study import SearchMismatch
from src.contract.flags import AUTO_EFFECTIVE_BATCH, DEFAULT_DATASET
from src.data.dataset import split_sizes
from src.planning.step_time import stage_steps

DEFAULT_VAL_FRACTION = 0.1
SELECTABLE = ("f1", "precision", "recall", "map_50", "map_50_95", "mean_iou")  # keys of metrics.json


def add_flags(p: argparse.ArgumentParser) -> None:
    search = p.add_argument_group(
        "learning-rate search: each recipe at its own best rate, chosen on a validation split, scored once "
        "on the test split"
    )
    search.add_argument(
        "--lr-search",
        action="store_true",
        help="try each recipe at several learning rates by successive halving on the validation split; "
        "the report compares each at its chosen rate, on the test split only (`plan --lr-search` shows the "
        "cost first); its jobs train eager unless --compile on",
    )
    search.add_argument(
        "--lr-grid",
        metavar="LR[,LR...]",
        help="the rates every recipe tries (a chain's stages scale together); default: each recipe's own "
        "rate x 3^k, k = -2..2",
    )
    search.add_argument(
        "--halving",
        type=int,
        metavar="ETA",
        help=f"the best 1/ETA of each rung go on from their checkpoints (default {DEFAULT_HALVING}); 1: no "
        "halving, every rate to the full budget",
    )
    search.add_argument(
        "--select-metric",
        choices=SELECTABLE,
        help="the validation metric the rates are chosen by (default f1, F1 at IoU 0.5, the report's); "
        "ties go to the lower validation loss",
    )


def problems(args: argparse.Namespace) -> list[str]:
    """Bad search flags, each naming itself; the search's own flags without --lr-search too."""
    asked = {
        "--lr-grid": args.lr_grid,
        "--halving": args.halving,
        "--select-metric": args.select_metric,
        "--val-fraction": args.val_fraction,
    }
    if not args.lr_search:
        return [f"{flag} needs --lr-search" for flag, value in asked.items() if value is not None]
    found = []
    if args.lr_grid is not None:
        try:
            parse_grid(args.lr_grid)
        except ValueError as error:
            found.append(str(error))
    if args.halving is not None and args.halving < 1:
        found.append(f"--halving {args.halving}: must be at least 1 (1: no halving)")
    if args.learning_rate is not None:
        found.append(
            "--learning-rate and --lr-search exclude each other: the search chooses each recipe's rate"
        )
    if args.seeds or args.datasets:
        found.append("--lr-search runs one seed on one data set: drop --seeds and --datasets")
    if args.skip_eval:
        found.append("--lr-search scores every trial on the validation split: drop --skip-eval")
    return found


def setup(args: argparse.Namespace, request: LaunchRequest) -> SearchSetup:
    """Each recipe's grid and budget, from the flags; UsageError when the budget cannot be counted."""
    fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    per_stage = _steps_per_stage(request, fraction)
    eta = args.halving or DEFAULT_HALVING
    grids, full, rungs = {}, {}, {}
    for key in request.recipes:
        recipe = request.recipe(key)
        grids[key] = parse_grid(args.lr_grid) if args.lr_grid else default_grid(recipe.learning_rate)
        full[key] = per_stage * len(recipe.stages or (recipe,))
        rungs[key] = rung_steps(full[key], len(grids[key]), eta)
    rates = {key: request.recipe(key).learning_rate for key in request.recipes}
    return SearchSetup(grids, full, rungs, eta, args.select_metric or "f1", fraction, per_stage, rates)


def _steps_per_stage(request: LaunchRequest, fraction: float) -> int:
    """--max-steps, else the epochs over the train split less its validation split (read, not loaded)."""
    flags = request.flags
    if flags.max_steps:
        return int(flags.max_steps)
    dataset = flags.dataset or DEFAULT_DATASET
    if not Path(dataset).exists():
        raise UsageError(
            f"--lr-search: cannot count the steps of an epoch of {dataset} without reading it here",
            "give --max-steps N (the full budget of one trial's stage)",
        )
    images = split_sizes(dataset, flags.image_root, fraction)["train"]["images"]
    batch, accum = rank_batch(flags, request.gpus_per_recipe)
    samples = AUTO_EFFECTIVE_BATCH if batch == "auto" else int(batch) * accum * request.gpus_per_recipe
    return stage_steps(-1, flags.effective("epochs"), images, samples)


def eager_trials(request: LaunchRequest) -> LaunchRequest:
    """A search's jobs train eager unless --compile on was asked. --compile auto compiles stages of 500 steps
    or more, where one compile (about 110 s cold) repays itself over a whole run; but every trial job would
    compile again for the part of the run its rung trains (36 jobs for four recipes at five rates)."""
    if request.flags.effective("compile") == "auto":
        return replace(request, flags=request.flags.replace(compile="off"))
    return request


def with_trial_flags(request: LaunchRequest, setup: SearchSetup) -> LaunchRequest:
    """Every trial trains at the full budget's schedule without its validation split (the rung pauses it)."""
    flags = request.flags.replace(max_steps=setup.stage_steps, val_fraction=setup.val_fraction)
    return replace(request, flags=flags)


def cost(setup: SearchSetup, plan: Plan) -> dict[str, dict[str, Any]]:
    """Per recipe: trials, rungs, the steps it trains, its jobs and its predicted GPU-hours, against one
    untuned run (the planner's step time; every job, each trial's at each rung and the test scoring, also
    pays a job's fixed seconds: its start, loading its model, its scoring)."""
    rows: dict[str, dict[str, Any]] = {}
    for key, grid in setup.grids.items():
        estimate = plan.memory.get(key)
        full = setup.full_steps[key]
        step_s = estimate.train_s / full if estimate and estimate.train_s else None
        trained = trial_steps(full, len(grid), setup.eta)
        jobs = trial_jobs(len(grid), setup.eta) + 1  # and the chosen run's one scoring on the test split
        fixed = _fixed_s(setup, key)
        rows[key] = {
            "trials": len(grid),
            "rungs": setup.rungs[key],
            "trained_steps": trained,
            "x_untuned": trained / full,
            "jobs": jobs,
            "fixed_s": fixed,
            "step_s": step_s,
            "gpu_hours": None if step_s is None else (trained * step_s + fixed * jobs) / 3600,
            "untuned_gpu_hours": None if step_s is None else (full * step_s + fixed) / 3600,
        }
    return rows


def _fixed_s(setup: SearchSetup, recipe: str) -> float:
    """A job's fixed seconds for this recipe (a chain loads a model for each of its stages)."""
    return fixed_seconds(setup.full_steps[recipe] // setup.stage_steps)


def twice_untuned_steps(setup: SearchSetup, rows: dict[str, dict[str, Any]]) -> int | None:
    """--max-steps from which the search costs at most 2x the untuned comparison's GPU-hours: its jobs'
    fixed seconds weigh less as the runs grow, and its steps stay x_untuned (1.67) of the untuned runs'.
    None where it never does (halving 1 trains every rate to the full budget: 5x the steps)."""
    fixed_excess = sum((row["jobs"] - 2) * row["fixed_s"] for row in rows.values())
    per_step = sum(
        (2 - row["x_untuned"]) * row["step_s"] * setup.full_steps[key] / setup.stage_steps
        for key, row in rows.items()
    )
    if per_step <= 0:
        return None
    return max(1, round(fixed_excess / per_step))


def search_makespan(setup: SearchSetup, plan: Plan, rooms: Sequence[GpuRoom], max_jobs: int) -> float | None:
    """Seconds the search is predicted to take on these GPUs (planning/makespan.py): rung after rung, each
    rung's trials of every recipe placed as the executor places them (a recipe's next rung waits for its own
    trials' scores; recipes are taken to wait for each other too, so this errs long), then each recipe's
    scoring on the test split. None without a memory plan."""
    jobs = {job.recipe: job for job in plan.jobs}
    rungs: dict[int, list[TimedJob]] = {}
    for key, grid in setup.grids.items():
        estimate, job = plan.memory.get(key), jobs.get(key)
        if estimate is None or job is None or not estimate.train_s:
            return None
        step_s = estimate.train_s / setup.full_steps[key]
        alive, done = len(grid), 0
        for index, step in enumerate(setup.rungs[key]):
            trial = TimedJob(job.reserve_mib, _fixed_s(setup, key), (step - done) * step_s, job.gpu_count)
            rungs.setdefault(index, []).extend([trial] * alive)
            done, alive = step, keep(alive, setup.eta)
    scorings = [
        TimedJob(jobs[key].reserve_mib, _fixed_s(setup, key), 0.0, jobs[key].gpu_count) for key in setup.grids
    ]
    return sum(predict_makespan(trials, rooms, max_jobs) for trials in [*rungs.values(), scorings])


def print_cost(
    setup: SearchSetup,
    plan: Plan,
    gpus: int,
    rooms: Sequence[GpuRoom] | None = None,
    max_jobs: int = 1,
) -> None:
    """What `plan --lr-search` adds: the search's trials, rungs and predicted cost, before anything starts."""
    rows = cost(setup, plan)
    table = [("recipe", "trials (rates)", "rungs end at step", "steps trained", "x one run", "GPU-hours")]
    for key, row in rows.items():
        rates = ", ".join(f"{rate:.3g}" for rate in setup.grids[key])
        hours = (
            "-"
            if row["gpu_hours"] is None
            else f"{row['gpu_hours']:.2f} (untuned {row['untuned_gpu_hours']:.2f})"
        )
        steps = ", ".join(map(str, row["rungs"]))
        table.append(
            (
                key,
                f"{row['trials']} ({rates})",
                steps,
                str(row["trained_steps"]),
                f"{row['x_untuned']:.2f}",
                hours,
            )
        )
    print(
        f"\nlearning-rate search: halving {setup.eta}, chosen by validation {setup.metric}, "
        f"validation split {setup.val_fraction:.0%} of train where the data set has none of its own"
    )
    print_rows(table)
    searched = [row["gpu_hours"] for row in rows.values()]
    if None not in searched and gpus:
        total = sum(searched)
        untuned = sum(row["untuned_gpu_hours"] for row in rows.values())
        simulated = search_makespan(setup, plan, rooms, max_jobs) if rooms else None
        makespan = simulated / 3600 if simulated else total / gpus  # else a lower bound: all GPUs always busy
        untuned_line = (
            f" (the untuned comparison about {plan.makespan_s / 60:.0f} min)" if plan.makespan_s else ""
        )
        print(
            f"predicted: {total:.2f} GPU-hours ({total / untuned:.2f}x the untuned comparison's "
            f"{untuned:.2f}); makespan about {makespan * 60:.0f} min on {gpus} GPU(s){untuned_line}"
        )
        _print_budget_line(setup, rows, total / untuned)
    else:
        print("predicted GPU-hours: unknown here (no memory plan: --cpu, Ray, or no local config.json)")


def _print_budget_line(setup: SearchSetup, rows: dict[str, dict[str, Any]], ratio: float) -> None:
    """Why a short search costs over 2x (each job pays a fixed start), and from where it does not."""
    if ratio <= 2:
        return
    jobs = sum(row["jobs"] for row in rows.values())
    fixed = sorted({round(row["fixed_s"]) for row in rows.values()})
    seconds = f"{fixed[0]}" if len(fixed) == 1 else f"{fixed[0]}-{fixed[-1]}"
    steps = twice_untuned_steps(setup, rows)
    where = (
        f"at most 2x from about --max-steps {steps}"
        if steps is not None
        else "never 2x: with --halving 1 every rate trains the full budget"
    )
    print(
        f"  the search starts {jobs} jobs where the untuned comparison starts {len(rows)}, each paying about "
        f"{seconds} s besides its training (start, model, scoring); that weighs less as runs grow: {where}"
    )


def run(
    args: argparse.Namespace,
    request: LaunchRequest,
    worker: list[str],
    launch_id: str,
    plan: Plan,
    rooms: Callable[[], list[GpuRoom]] | None,
    backend: Callable[[], Backend],
    policy: RunPolicy,
) -> int:
    """The searched launch: trials rung by rung, then each recipe's chosen run on the test split."""
    settings = setup(args, request)
    plan.launch_dir.mkdir(parents=True, exist_ok=True)
    live = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb" and not args.plain
    trials = sum(len(grid) for grid in settings.grids.values())
    print(
        f"recipe-run: launch {launch_id}: a learning-rate search of {len(request.recipes)} recipe(s), "
        f"{trials} trials, halving {settings.eta}; everything goes to {plan.launch_dir}"
    )
    dataset = request.flags.dataset or DEFAULT_DATASET
    splits = (
        split_sizes(dataset, request.flags.image_root, settings.val_fraction)
        if Path(dataset).exists()
        else {}
    )
    launch = SearchLaunch(
        request=with_trial_flags(request, settings),
        setup=settings,
        launch_id=launch_id,
        launch_dir=plan.launch_dir,
        worker=worker,
        rooms=rooms,
        memory=plan.memory,
        cores=os.cpu_count() or 1,
        backend=backend,
        reporter=lambda: LiveReporter(sys.stdout) if live else PlainReporter(sys.stdout),
        policy=policy,
        command=["recipe-run", *args.argv],
        splits=splits,
    )
    try:
        code = run_search(launch)
    except SearchMismatch as error:
        raise UsageError(str(error), "resume it with the settings it was launched with") from None
    summary = read_summary(plan.launch_dir) or {"jobs": []}
    print("\n" + render_summary([JobResult(**job) for job in summary["jobs"]]))
    print(f"\nsummary: {plan.launch_dir / 'summary.json'}; the search: {plan.launch_dir / 'search.json'}")
    report_or_say(plan.launch_dir)
    return code
