"""What `recipe-run plan` shows: a Plan job by job, or every recipe on GPU sizes this machine lacks.

Printing only: the decisions are placement.py's. No torch (the launcher's rule).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import replace

from recipe_runner.gpus import cpu_list_text
from recipe_runner.placement import LaunchRequest, Plan, PlanError, plan_recipe, planner_inputs, sharing
from recipe_runner.plan import GpuSelection, bind_gpus


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


def plan_for_sizes(request: LaunchRequest, sizes_gib: Sequence[float]) -> int:
    """`plan --gpu-memory`: every recipe on GPUs of the given sizes, from config.json and the data alone."""
    from src.training.worker import DEFAULT_BATCH_SIZE

    inputs = planner_inputs(request, fetch=True)
    if inputs is None:
        raise PlanError(
            "cannot plan: the model's config.json (a local directory, or a hub id whose config.json is "
            "cached or can be downloaded) and a local data set are needed",
            "give --model-id DIR (or a hub id while online) and --dataset DIR",
        )
    shape, workload = inputs
    batch = request.flags.batch_size or DEFAULT_BATCH_SIZE
    print(
        f"model {request.flags.model_id}: {shape.layers} layers, hidden {shape.hidden}; largest sample "
        f"{workload.patches} image patches + {workload.text_tokens} text tokens. Nothing was started."
    )
    rows = [("recipe", "GPU", f"at --batch-size {batch}", "verdict", "--batch-size auto would run")]
    for recipe in (request.recipe(name) for name in request.recipes):
        rows += [_size_row(request, recipe, inputs, batch, gib) for gib in sizes_gib]
    print_rows(rows)
    return 0


def _size_row(request: LaunchRequest, recipe, inputs, batch: int | str, gib: float) -> tuple[str, ...]:
    """One recipe on one GPU size: the peak at the asked batch, the verdict, and auto's choice."""
    mib = int(gib * 1024)
    asked = replace(request, flags=replace(request.flags, batch_size=batch))
    auto = replace(request, flags=replace(request.flags, batch_size="auto"))
    plan = plan_recipe(asked, recipe, inputs, mib) if batch != "auto" else None
    best = plan_recipe(auto, recipe, inputs, mib)
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


def print_rows(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
