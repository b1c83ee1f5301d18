"""`recipe-run plan`: what a launch would do, job by job (GPU, command, environment, log, predicted memory
and time, the reason for each choice), or with `--gpu-memory GIB` every recipe on GPU sizes this machine
lacks. Starts nothing, writes nothing.

    recipe-run plan --recipes all
    recipe-run plan --recipes all --gpu-memory 24 --gpu-memory 80 --model-id DIR --dataset D

It takes every flag of `launch` (launch.py); printing only: the decisions are planning/placement.py's.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Sequence
from dataclasses import replace

from recipe_runner.cli import launch, lr_search
from recipe_runner.cli.common import UsageError, print_rows
from recipe_runner.host.gpus import GpuInfo, cpu_list_text, probe_gpus
from recipe_runner.planning.estimates import estimate_recipe, planner_inputs
from recipe_runner.planning.gpu_choice import GpuSelection
from recipe_runner.planning.jobs import bind_gpus
from recipe_runner.planning.makespan import makespan_line
from recipe_runner.planning.placement import Plan, sharing
from recipe_runner.planning.request import LaunchRequest, PlanError

HELP = "show which recipe goes to which GPU, with command and env; start nothing"


def add_flags(p: argparse.ArgumentParser) -> None:
    launch.add_flags(p)
    p.add_argument(
        "--gpu-memory",
        type=float,
        action="append",
        metavar="GIB",
        help="plan for a GPU of this many GiB instead of this host's (repeat for several; no GPU or NVML "
        "needed): each recipe's predicted peak, whether it fits, and what --batch-size auto would run",
    )


def run(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> int:
    problems = [
        f"--gpu-memory {gib:g}: give a size in GiB above 0, like 24 or 80"
        for gib in getattr(args, "gpu_memory", None) or []
        if gib <= 0
    ]
    if problems:
        raise UsageError("\n  ".join(problems), "see 'recipe-run plan --help'")
    request, worker = launch.prepare(args)
    if getattr(args, "gpu_memory", None):
        try:
            return print_sizes(request, args.gpu_memory)
        except PlanError as error:
            raise UsageError(str(error), error.hint) from None
    return show(args, request, worker, probe)


def show(
    args: argparse.Namespace, request: LaunchRequest, worker: list[str], probe: Callable[[], list[GpuInfo]]
) -> int:
    _launch_id, placed, selection, pool = launch.place(args, request, worker, probe)
    print_plan(placed, selection)
    if args.lr_search:  # the jobs above are one untuned run of each recipe; the search's cost follows
        gpus = len(selection.pool) if selection else 0
        rooms = pool.rooms() if pool is not None else None
        lr_search.print_cost(lr_search.setup(args, request), placed, gpus, rooms, request.max_jobs)
    return 0


def print_plan(plan: Plan, selection: GpuSelection | None) -> None:
    """What a launch would do, job by job; nothing is started and nothing written."""
    print(f"launch directory: {plan.launch_dir} (plan only: nothing started, nothing written)")
    print("env+ lists what each worker gets on top of this environment")
    names = ",".join(gpu.label for gpu in selection.pool) if selection else ""
    together = sharing(plan.first_wave)
    for index, job in enumerate(plan.jobs):
        gpus = plan.first_wave[index] if plan.on_gpus else None
        shown = bind_gpus(job, gpus, selection.cores if selection else None) if gpus else job
        if plan.on_gpus and gpus is None:
            where = f"queued: starts when {job.gpu_count} of {names} have room"
        elif gpus:
            where = ", ".join(f"{gpu.label} ({gpu.uuid}, {gpu.name})" for gpu in gpus)
            shared = max(together[gpu.uuid] for gpu in gpus)
            where += f"; shares it with {shared - 1} other job(s)" if shared > 1 else ""
        else:
            where = f"cpu, {shown.threads} thread(s)" if shown.threads else "the Ray cluster"
        env = dict(shown.env)
        if plan.on_gpus and gpus is None:
            env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES="<UUID of the GPU it gets>")
        print(f"\n{job.key}: {where}")
        print(f"  command: {shlex.join(shown.argv)}")
        print(f"  env+:    {' '.join(f'{k}={v}' for k, v in sorted(env.items()))}")
        print(f"  log:     {shown.log_path}")
        if shown.cpus:
            print(f"  cores:   {cpu_list_text(shown.cpus)} (its GPU's share; --pin-cpus off: any core)")
        if job.recipe in plan.memory:
            print(f"  memory:  {plan.memory[job.recipe].describe()}")
        if plan.on_gpus:
            print(f"  placed:  {plan.reason(job)}")
    if line := makespan_line(plan):
        print(f"\n{line}")


def print_sizes(request: LaunchRequest, sizes_gib: Sequence[float]) -> int:
    """`plan --gpu-memory`: every recipe on GPUs of the given sizes, from config.json and the data alone."""
    inputs = planner_inputs(request, fetch=True)
    if inputs is None:
        raise PlanError(
            "cannot plan: the model's config.json (a local directory, or a hub id whose config.json is "
            "cached or can be downloaded) and a local data set are needed",
            "give --model-id DIR (or a hub id while online) and --dataset DIR",
        )
    shape, workload = inputs
    batch = request.flags.effective("batch_size")
    print(
        f"model {request.flags.model_id}: {shape.layers} layers, hidden {shape.hidden}; largest sample "
        f"{workload.patches} image patches + {workload.text_tokens} text tokens. Nothing was started."
    )
    rows: list[tuple[str, ...]] = [
        ("recipe", "GPU", f"at --batch-size {batch}", "verdict", "--batch-size auto would run")
    ]
    for recipe in (request.recipe(name) for name in request.recipes):
        rows += [_size_row(request, recipe, inputs, batch, gib) for gib in sizes_gib]
    print_rows(rows)
    return 0


def _size_row(request: LaunchRequest, recipe, inputs, batch: int | str, gib: float) -> tuple[str, ...]:
    """One recipe on one GPU size: the peak at the asked batch, the verdict, and auto's choice."""
    mib = int(gib * 1024)
    asked = replace(request, flags=request.flags.replace(batch_size=batch))
    auto = replace(request, flags=request.flags.replace(batch_size="auto"))
    plan = estimate_recipe(asked, recipe, inputs, mib) if batch != "auto" else None
    best = estimate_recipe(auto, recipe, inputs, mib)
    peak, fits = "-", best is not None
    if plan is not None:
        peak = f"{plan.predicted_gib:.1f} GiB (recompute {_recompute(plan)})"
        fits = plan.fits
    choice = "nothing fits, even micro-batch 1 with recompute"
    if best is not None:
        choice = f"{best.batch_size} x {best.grad_accum}, recompute {_recompute(best)}, "
        choice += f"{best.predicted_gib:.1f} GiB, ~{best.predicted_step_s:.2f} s a step"
    return (recipe.name, f"{gib:g} GiB", peak, "fits" if fits else "does not fit", choice)


def _recompute(plan) -> str:
    return "on, offloaded" if plan.offloaded else "on" if plan.checkpointing else "off"
