"""Time to report: the predicted makespan of a launch's jobs on its GPUs, and the lower-memory settings that
shorten it. Pure code.

    from recipe_runner.planning.makespan import TimedJob, predict_makespan
    predict_makespan([TimedJob(40_000, 27.0, 8.0), TimedJob(6_000, 27.0, 20.0)], rooms, max_jobs=4)

A job holds its reservation from its start to its end, and spends its time in two parts: a fixed part
(process start, model load, evaluation) that overlaps freely with other jobs, and its training, which shares
the GPU's compute with the other jobs training there: k jobs training on one GPU each go 1/k as fast (the
GPU is busy 90% of an eager or compiled step at the planner's setting, docs/benchmarks.md, so two steps do
not hide in each other's gaps). Jobs start as the executor starts them (placement.first_wave's rule, applied
again whenever a job ends): the longest first, and any that fits beside the running ones.

Packing buys time only where a job's fixed part runs beside another's training, so it pays at short
budgets and not at long ones, where the fastest settings also do the least GPU work. `choose_settings` weighs
exactly that: a recipe gets a lower-memory setting (recompute, a smaller micro-batch, no bf16 copies) only
when the whole launch is predicted to end MAKESPAN_GAIN sooner with it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from recipe_runner.planning.estimates import MemoryEstimate
from recipe_runner.planning.placement import GpuRoom, Plan, choose_gpus, make_plan, start_order
from recipe_runner.planning.request import LaunchRequest

# A job's seconds besides its training steps: process start and imports, loading the model, the evaluation
# and the zero-shot baseline's share. Measured on one H100 (docs/benchmarks.md, eleventh session, 2B, 10
# steps, 16 test images): 25-29 s a job beside its training, 35 s for r3's two stages; the ninth session's
# 7B jobs (30 steps, one H100) left 25-30 s. A chain's later stages load again.
JOB_FIXED_S = 27.0
STAGE_FIXED_S = 8.0  # each further stage of a chain: its model loaded again
MAKESPAN_GAIN = 0.10  # a lower-memory setting must shorten the predicted makespan by this share


@dataclass(frozen=True)
class TimedJob:
    """A job as the makespan sees it: what it reserves on each of its GPUs, and its seconds alone."""

    mib: int | None  # None: its GPUs whole
    fixed_s: float  # beside others' training
    train_s: float  # alone on its GPU
    gpus: int = 1


@dataclass
class _Running:
    job: TimedJob
    gpus: tuple[str, ...]
    fixed_left: float
    train_left: float


def predict_makespan(jobs: Sequence[TimedJob], rooms: Sequence[GpuRoom], max_jobs: int) -> float:
    """Seconds from the first start to the last end; infinite when some job can never be placed."""
    waiting = [jobs[i] for i in start_order([job.train_s for job in jobs])]  # as the executor orders them
    running: list[_Running] = []
    now = 0.0
    while waiting or running:
        waiting = _start(waiting, running, rooms, max_jobs)
        if not running:
            return float("inf")  # nothing runs and nothing more fits: it never would
        training = _training_per_gpu(running)
        step = min(_time_left(r, training) for r in running)
        now += step
        for r in running:
            _advance(r, step, training)
        running = [r for r in running if r.fixed_left > 1e-9 or r.train_left > 1e-9]
    return now


def _start(
    waiting: list[TimedJob], running: list[_Running], rooms: Sequence[GpuRoom], max_jobs: int
) -> list[TimedJob]:
    """Start every waiting job that fits beside the running ones, in order; returns those still waiting."""
    left = []
    for job in waiting:
        taken = list(rooms)
        for r in running:
            taken = [room.with_job(r.job.mib) if room.gpu.uuid in r.gpus else room for room in taken]
        chosen = choose_gpus(taken, job.gpus, job.mib, max_jobs)
        if chosen is None:
            left.append(job)
            continue
        running.append(_Running(job, tuple(gpu.uuid for gpu in chosen), job.fixed_s, job.train_s))
    return left


def _training_per_gpu(running: Sequence[_Running]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in running:
        if r.fixed_left <= 1e-9 and r.train_left > 1e-9:
            for uuid in r.gpus:
                counts[uuid] = counts.get(uuid, 0) + 1
    return counts


def _share(r: _Running, training: Mapping[str, int]) -> int:
    return max((training.get(uuid, 1) for uuid in r.gpus), default=1)


def _time_left(r: _Running, training: Mapping[str, int]) -> float:
    """Seconds until this job's current part ends at today's rates."""
    if r.fixed_left > 1e-9:
        return r.fixed_left
    return r.train_left * _share(r, training)


def _advance(r: _Running, seconds: float, training: Mapping[str, int]) -> None:
    if r.fixed_left > 1e-9:
        r.fixed_left -= seconds
        return
    r.train_left -= seconds / _share(r, training)


def fixed_seconds(stages: int) -> float:
    """A job's seconds besides its training steps (JOB_FIXED_S, STAGE_FIXED_S)."""
    return JOB_FIXED_S + STAGE_FIXED_S * max(0, stages - 1)


EXHAUSTIVE_MAX = 1024  # combinations of settings tried one by one; more are searched one change at a time


def choose_settings(
    options: Mapping[str, Sequence[object]], makespan_of: Callable[[Mapping[str, object]], float]
) -> tuple[dict[str, object], float, float]:
    """(the setting chosen for each recipe, its predicted makespan, the fastest settings' makespan).

    `options`: recipe -> its settings, the fastest first (the one it runs alone). Every combination is tried
    when there are at most EXHAUSTIVE_MAX (a launch's few recipes, a few settings each), else one recipe's
    setting is changed at a time while that helps. The fastest settings are left only for a makespan
    MAKESPAN_GAIN shorter: a smaller gain is within the model's error.
    """
    fastest_choice = {recipe: settings[0] for recipe, settings in options.items()}
    fastest = makespan_of(fastest_choice)
    if math.prod(len(settings) for settings in options.values()) <= EXHAUSTIVE_MAX:
        combos = (dict(zip(options, combo, strict=True)) for combo in itertools.product(*options.values()))
        seconds, chosen = min(((makespan_of(c), c) for c in combos), key=lambda pair: pair[0])
    else:
        chosen, seconds = _descend(options, makespan_of, fastest_choice, fastest)
    if seconds > fastest * (1 - MAKESPAN_GAIN):
        return fastest_choice, fastest, fastest
    return chosen, seconds, fastest


def _descend(options, makespan_of, chosen: dict, best: float) -> tuple[dict, float]:
    """From `chosen`, the one change of a recipe's setting that shortens the makespan most, while one does."""
    while True:
        trials = [
            {**chosen, recipe: setting}
            for recipe, settings in options.items()
            for setting in settings
            if setting is not chosen[recipe]
        ]
        scored = [(makespan_of(trial), trial) for trial in trials]
        if not scored:
            return chosen, best
        seconds, trial = min(scored, key=lambda pair: pair[0])
        if seconds >= best:
            return chosen, best
        chosen, best = trial, seconds


def quickest_plan(
    request: LaunchRequest,
    launch_id: str,
    worker: Sequence[str],
    rooms: Sequence[GpuRoom],
    settings: Mapping[str, Sequence[MemoryEstimate]],
    cores: int,
) -> Plan:
    """make_plan with each recipe's setting (estimates.estimate_settings: the fastest first) chosen for the
    launch's predicted makespan, which the Plan carries beside that of the fastest settings."""

    def plan_with(chosen: Mapping[str, object]) -> Plan:
        memory = {recipe: plan for recipe, plan in chosen.items() if isinstance(plan, MemoryEstimate)}
        return make_plan(request, launch_id, worker, rooms, memory, cores)

    def makespan_of(chosen: Mapping[str, object]) -> float:
        return predict_makespan(timed_jobs(plan_with(chosen), request), rooms, request.max_jobs)

    chosen, seconds, fastest = choose_settings(settings, makespan_of)
    return replace(plan_with(chosen), makespan_s=seconds, fastest_makespan_s=fastest)


def timed_jobs(plan: Plan, request: LaunchRequest) -> list[TimedJob]:
    """The plan's jobs as the makespan sees them."""
    return [
        TimedJob(
            job.reserve_mib,
            fixed_seconds(len(request.recipe(job.recipe).stages or (None,))),
            job.predicted_s,
            job.gpu_count,
        )
        for job in plan.jobs
    ]


def makespan_line(plan: Plan) -> str | None:
    """The plan's predicted makespan in one line (None where not predicted), and the recipes it planned
    smaller than their fastest setting, with what that saves."""
    if plan.makespan_s is None or not math.isfinite(plan.makespan_s):
        return None
    line = f"predicted makespan about {plan.makespan_s:.0f} s (first start to last end"
    smaller = [name for name, memory in plan.memory.items() if memory.share > 1]
    if not smaller:
        return line + ", every recipe at its fastest setting)"
    return (
        line + f"): {', '.join(smaller)} planned smaller than their fastest setting, so that jobs run "
        f"side by side instead of waiting; at their fastest settings about {plan.fastest_makespan_s:.0f} s"
    )
