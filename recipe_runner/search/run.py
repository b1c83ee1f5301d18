"""`recipe-run --lr-search`: each recipe at its own best learning rate, chosen on the validation split by
synchronous successive halving, then scored once on the test split.

    recipe-run --recipes all --lr-search                     # each recipe's rate x 3^k, k = -2..2
    recipe-run --recipes r1,r4 --lr-search --lr-grid 1e-3,3e-3,1e-2 --max-steps 27

Rung by rung, every recipe's live trials run as ordinary jobs (placed, packed and retried like any launch,
on either backend): trial `n` of a recipe is the job `<recipe>-lr<n>` training with the grid's n-th rate,
its validation split held out of its training data, paused at the rung's step with a checkpoint (the
schedule is the full run's: a rung is a pause, not a shorter run), and scored on the validation split.
The rung rule (rungs.py) keeps the best third; they go on from their checkpoints. The trial that reaches
the full budget is the recipe's chosen run: one more job of it reads the test split, for the first time,
and the report is built from those scores alone. The study (study.py) records every score, so a crash or
Ctrl-C loses nothing: `recipe-run resume LAUNCH_DIR` goes on from where the search stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from recipe_runner.backends.base import Backend
from recipe_runner.backends.loop import RunPolicy, run_jobs
from recipe_runner.planning.estimates import MemoryEstimate
from recipe_runner.planning.jobs import JobSpec, split_threads, with_flag, without_flag
from recipe_runner.planning.placement import GpuRoom, make_plan
from recipe_runner.planning.request import LaunchRequest, SweepPoint
from recipe_runner.results.live import PlainReporter
from recipe_runner.results.summary import JobResult, launch_exit_code, write_summary
from recipe_runner.search.rungs import Score, promoted
from recipe_runner.search.study import SearchRecord, Trial, trial_name
from src.contract.flags import flag_name
from src.utils.files import read_json


@dataclass(frozen=True)
class SearchSetup:
    """What the search was asked: per recipe its grid and budget; how it halves and what it selects by."""

    grids: Mapping[str, list[float]]  # recipe -> learning rates, in the order of the trials' numbers
    full_steps: Mapping[str, int]  # recipe -> optimizer steps of its whole run (a chain: every stage's)
    rungs: Mapping[str, list[int]]  # recipe -> the step each rung ends at
    eta: int
    metric: str  # the validation metric the rung rule compares (report's F1@0.5 by default)
    val_fraction: float
    stage_steps: int  # --max-steps of every trial's every stage
    rates: Mapping[str, float]  # recipe -> its own (reference) rate: a trial scales every stage by rate / it

    def config(self, recipe: str) -> dict:
        """What the recipe's study is bound to: a resume with other settings is refused."""
        return {
            "full_steps": self.full_steps[recipe],
            "rungs": self.rungs[recipe],
            "eta": self.eta,
            "metric": self.metric,
            "val_fraction": self.val_fraction,
        }


@dataclass
class SearchLaunch:
    """Everything a search needs to run its jobs, decided by the launch before it starts."""

    request: LaunchRequest
    setup: SearchSetup
    launch_id: str
    launch_dir: Path
    worker: list[str]
    rooms: Callable[[], Sequence[GpuRoom]] | None  # the pool's rooms now; None off local GPUs
    memory: Mapping[str, MemoryEstimate]
    cores: int
    backend: Callable[[], Backend]  # a fresh backend for each round of jobs
    reporter: Callable[[], PlainReporter]
    policy: RunPolicy
    command: list[str]
    splits: dict  # how each split was made and its size (src.data.dataset.split_sizes)


def run_search(launch: SearchLaunch) -> int:
    """Every rung of every recipe, then the chosen runs on the test split; the launch's exit code."""
    record = SearchRecord(launch.launch_dir)
    recipes = launch.request.recipes
    for recipe in recipes:
        record.open(recipe, launch.setup.grids[recipe], launch.setup.config(recipe))
    results: list[JobResult] = []  # every trial job of every rung, for summary.json and the search's cost
    for rung in range(max(len(launch.setup.rungs[r]) for r in recipes)):
        wanted = [(r, t) for r in recipes for t in _due(record, launch.setup, r, rung)]
        if wanted:
            done, signum = _run(launch, [_trial_job(launch, r, t, rung) for r, t in wanted], record, results)
            _record_scores(launch, record, wanted, done, rung, interrupted=signum is not None)
            if signum is not None:  # the scores so far are in the study: `recipe-run resume` goes on
                return _finish(launch, record, results, signum)
        for recipe in recipes:
            _decide(record, launch.setup, recipe, rung)
    finals = _final_jobs(launch, record)
    done, signum = _run(launch, finals, record, results, final=True)
    return _finish(launch, record, results, signum, finals=done)


def _due(record: SearchRecord, setup: SearchSetup, recipe: str, rung: int) -> list[Trial]:
    """The recipe's trials still in the search that have not been scored at this rung yet."""
    steps = setup.rungs[recipe]
    if rung >= len(steps):
        return []
    return [t for t in record.trials(recipe) if t.state == "running" and steps[rung] not in t.scores]


def _trial_job(launch: SearchLaunch, recipe: str, trial: Trial, rung: int) -> JobSpec:
    """Trial `trial` of `recipe` trained to the rung's step at its rate, scored on the validation split."""
    job = _planned(launch, recipe, trial.number)
    step, full = launch.setup.rungs[recipe][rung], launch.setup.full_steps[recipe]
    argv = without_flag(
        job.argv, flag_name("baseline_dir")
    )  # the base is scored on the test split, at the end
    argv = with_flag(argv, flag_name("lr_scale"), _scale(launch, recipe, trial))
    argv = with_flag(argv, flag_name("eval_split"), "validation")
    if step < full:
        argv = with_flag(argv, flag_name("pause_at"), str(step))
    if (job.output_dir / "status.json").is_file():  # an earlier rung (or an interrupted try) ran
        argv = with_flag(argv, flag_name("resume"))
    return replace(job, argv=argv, predicted_s=job.predicted_s * step / full)


def _scale(launch: SearchLaunch, recipe: str, trial: Trial) -> str:
    """--lr-scale of a trial: its rate over the recipe's own, by which every stage's rate is multiplied."""
    return repr(trial.learning_rate / launch.setup.rates[recipe])


def _planned(launch: SearchLaunch, recipe: str, number: int) -> JobSpec:
    """The job of one trial as the launch's placement plans it (packing, GPUs, threads), before its rung."""
    point = SweepPoint(tag=f"-lr{number}")
    request = replace(launch.request, recipes=(recipe,), sweep=(point,), threads=_trial_threads(launch))
    rooms = launch.rooms() if launch.rooms is not None else None
    plan = make_plan(request, launch.launch_id, launch.worker, rooms, launch.memory, launch.cores)
    (job,) = plan.jobs
    assert job.key == trial_name(recipe, number)
    return job


def _trial_threads(launch: SearchLaunch) -> int | None:
    """--threads of one trial: on this host's CPU as many trials run at once as the launch has recipes,
    and they share the cores as those would (planned alone, each would take every core)."""
    request = launch.request
    if request.cpu and request.backend != "ray":
        return split_threads(request.threads or launch.cores, request.jobs)
    return request.threads


def _run(
    launch: SearchLaunch,
    specs: list[JobSpec],
    record: SearchRecord,
    results: list[JobResult],
    final: bool = False,
) -> tuple[list[JobResult], int | None]:
    """One round of jobs through the run loop; summary.json stays true while they run."""

    def keep_summary_true(now: list[JobResult]) -> None:
        shown = {**{r.name: r for r in results}, **{r.name: r for r in now}}  # each trial's latest
        extra = {"splits": launch.splits, "search": STUDY_SUMMARY}
        write_summary(launch.launch_dir, launch.launch_id, list(shown.values()), None, launch.command, extra)
        _write_search(launch, record, [*results, *now])

    done, signum = run_jobs(specs, launch.backend(), launch.reporter(), launch.policy, keep_summary_true)
    if not final:
        results.extend(done)
    return done, signum


def _record_scores(
    launch: SearchLaunch,
    record: SearchRecord,
    wanted: list[tuple[str, Trial]],
    done: list[JobResult],
    rung: int,
    interrupted: bool = False,
) -> None:
    """Each trial's validation score at the rung, or its failure (the search goes on without it). After a
    Ctrl-C only the trials that finished are recorded: the others run again on resume."""
    by_name = {r.name: r for r in done}
    for recipe, trial in wanted:
        result = by_name[trial.name]
        step = launch.setup.rungs[recipe][rung]
        metrics = read_json(Path(result.output_dir) / "metrics.json") or {}
        value = metrics.get(launch.setup.metric)
        scored_on = (metrics.get("eval") or {}).get("split")
        if interrupted and result.status != "succeeded":
            continue
        if result.status != "succeeded" or scored_on != "validation" or value is None:
            why = result.error or f"{result.status} (exit {result.exit_code})"
            record.fail(recipe, trial.number, f"rung {rung + 1} (step {step}): {why}")
            continue
        status = read_json(Path(result.output_dir) / "status.json") or {}
        record.report(recipe, trial.number, step, float(value), status.get("val_loss"))


def _decide(record: SearchRecord, setup: SearchSetup, recipe: str, rung: int) -> None:
    """The rung rule: the best third go on, the rest stop; at the last rung the one left is complete."""
    steps = setup.rungs[recipe]
    if rung >= len(steps):
        return
    step = steps[rung]
    scored = [t for t in record.trials(recipe) if t.state == "running" and step in t.scores]
    scores = [Score(t.number, t.scores[step], t.val_losses.get(step)) for t in scored]
    going_on = set(promoted(scores, setup.eta)) if rung < len(steps) - 1 else {s.trial for s in scores}
    for trial in scored:
        if trial.number not in going_on:
            record.prune(recipe, trial.number)
        elif rung == len(steps) - 1:
            record.complete(recipe, trial.number, trial.scores[step])


def chosen(record: SearchRecord, recipe: str) -> Trial | None:
    """The recipe's trial that reached the full budget, if any did."""
    return next((t for t in record.trials(recipe) if t.state == "complete"), None)


def _final_jobs(launch: SearchLaunch, record: SearchRecord) -> list[JobSpec]:
    """Each recipe's chosen run, once more, for its one reading of the test split (nothing trains: every
    stage is done); the first also scores the untrained base there, the zero-shot baseline."""
    jobs: list[JobSpec] = []
    for recipe in launch.request.recipes:
        trial = chosen(record, recipe)
        if trial is None:
            continue
        job = _planned(launch, recipe, trial.number)
        argv = without_flag(job.argv, flag_name("baseline_dir"))
        argv = with_flag(argv, flag_name("lr_scale"), _scale(launch, recipe, trial))
        argv = with_flag(with_flag(argv, flag_name("eval_split"), "test"), flag_name("resume"))
        if not jobs and not launch.request.flags.skip_eval:
            argv = with_flag(argv, flag_name("baseline_dir"), str(launch.launch_dir / "base"))
        log = job.log_path.with_name(f"{recipe}.log")
        jobs.append(replace(job, argv=argv, name=recipe, log_path=log, predicted_s=0.0))
    return jobs


def search_summary(launch: SearchLaunch, record: SearchRecord, jobs: Sequence[JobResult] = ()) -> dict:
    """The search as search.json and the report carry it: every trial, the chosen rates, the cost (the
    device-hours of every trial job so far, per recipe)."""
    trials, picked = [], {}
    for recipe in launch.request.recipes:
        rungs = launch.setup.rungs[recipe]
        for trial in record.trials(recipe):
            trials.append(
                {
                    "recipe": recipe,
                    "trial": trial.name,
                    "learning_rate": trial.learning_rate,
                    "rung": (rungs.index(trial.reached) + 1) if trial.reached in rungs else 0,
                    "steps": trial.reached,
                    "val_metric": trial.scores.get(trial.reached),
                    "val_scores": {str(step): value for step, value in sorted(trial.scores.items())},
                    "val_loss": trial.val_losses.get(trial.reached),
                    "status": trial.state,
                    "error": trial.error,
                }
            )
        if (best := chosen(record, recipe)) is not None:
            picked[recipe] = best.learning_rate
    setup = launch.setup
    return {
        "metric": setup.metric,
        "halving": setup.eta,
        "grids": {recipe: list(grid) for recipe, grid in setup.grids.items()},
        "rungs": {recipe: list(steps) for recipe, steps in setup.rungs.items()},
        "full_steps": dict(setup.full_steps),
        "chains": [key for key in launch.request.recipes if launch.request.recipe(key).stages],
        "last_stage_from": _last_stage_from(launch),
        "trials": trials,
        "chosen": picked,
        "device_hours": _device_hours(jobs),
    }


def _last_stage_from(launch: SearchLaunch) -> dict[str, int]:
    """chain -> the chain step after which its last stage trains (every stage runs the same steps)."""
    starts = {}
    for key in launch.request.recipes:
        stages = launch.request.recipe(key).stages
        if stages:
            full = launch.setup.full_steps[key]
            starts[key] = full - full // len(stages)
    return starts


def _device_hours(jobs: Sequence[JobResult]) -> dict[str, float]:
    """recipe -> hours its trial jobs held their devices (a CPU job counts as one device)."""
    hours: dict[str, float] = {}
    for job in jobs:
        held = (job.duration_s or 0.0) * max(1, len(job.gpu_uuids)) / 3600
        hours[job.recipe] = round(hours.get(job.recipe, 0.0) + held, 5)
    return hours


STUDY_SUMMARY = "search.json"  # every trial and the chosen rates, beside summary.json (search.db: the study)


def _write_search(launch: SearchLaunch, record: SearchRecord, jobs: Sequence[JobResult]) -> None:
    path = launch.launch_dir / STUDY_SUMMARY
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(search_summary(launch, record, jobs), indent=2) + "\n")
    tmp.replace(path)


def _finish(
    launch: SearchLaunch,
    record: SearchRecord,
    trials: list[JobResult],
    signum: int | None,
    finals: Sequence[JobResult] = (),
) -> int:
    """summary.json: the chosen runs as the launch's jobs (what the report compares), a recipe without one
    as failed; every trial's job under `trials`; exit 0 only when every recipe has a scored run."""
    by_recipe = {r.name: _whole_run(r, record, trials) for r in finals}
    jobs = []
    for recipe in launch.request.recipes:
        if recipe in by_recipe:
            jobs.append(by_recipe[recipe])
        elif signum is None:
            jobs.append(_no_run(launch, record, recipe))
    code = launch_exit_code(jobs, signum) if jobs else (128 + signum if signum else 1)
    extra = {"trials": [asdict(t) for t in trials], "splits": launch.splits, "search": STUDY_SUMMARY}
    write_summary(launch.launch_dir, launch.launch_id, jobs, code, launch.command, extra)
    _write_search(launch, record, [*trials, *finals])
    return code


def _whole_run(final: JobResult, record: SearchRecord, trials: Sequence[JobResult]) -> JobResult:
    """A recipe's row: its test scoring with the time of its chosen trial's every rung added, so that the
    report's wall time and GPU-hours are those of the run that was scored, not of its last job alone."""
    trial = chosen(record, final.recipe)
    rungs = [job.duration_s or 0.0 for job in trials if trial is not None and job.name == trial.name]
    return replace(final, duration_s=round((final.duration_s or 0.0) + sum(rungs), 3))


def _no_run(launch: SearchLaunch, record: SearchRecord, recipe: str) -> JobResult:
    """A recipe whose every trial failed: a failed row in the report, with the trials' errors."""
    errors = [t.error for t in record.trials(recipe) if t.error]
    return JobResult(
        recipe=recipe,
        device="-",
        gpu_uuids=[],
        status="failed",
        exit_code=None,
        duration_s=None,
        final_loss=None,
        output=None,
        output_dir=str(launch.launch_dir / recipe),
        log="",
        error="every trial of the search failed: " + "; ".join(errors[:3]),
        name=recipe,
    )
