"""The benchmark's end-to-end rows (`python -m src.bench --end-to-end`): one whole worker process per
recipe, timed by phase (import, load, first step, train, save, exit) from when its output lines arrive.
`split_phases` is pure; tests feed it recorded lines.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from src.bench.measure import release_gpu_memory, round_or_none
from src.recipes import resolve_recipe

log = logging.getLogger("bench")


def end_to_end(target, recipe_key: str, setting, args, device: str) -> dict:
    """One whole worker run (import, load, train `--e2e-steps`, save; no evaluation), timed by phase.

    The worker runs at `setting` (the planner's for the recipe's first stage); `--e2e-args` adds flags.
    Phases come from the times its progress events and log lines arrive here (split_phases).
    """
    recipe = resolve_recipe(recipe_key)
    out = Path(args.work) / "e2e" / f"{target.label}-{recipe.name}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        sys.executable, "-m", "src.training.worker", "--recipe", recipe.name,
        "--model-id", str(target.model_dir), "--dataset", str(target.data_dir), "--output-dir", str(out),
        "--max-steps", str(args.e2e_steps), "--batch-size", str(setting.micro_batch),
        "--grad-accum", str(setting.grad_accum),
        "--gradient-checkpointing", "on" if setting.checkpointing else "off",
        "--skip-eval", "--no-wandb", "--save-steps", "0",
        *(["--cpu"] if device == "cpu" else []), *shlex.split(args.e2e_args),
        *(["--recipes-file", args.recipes_file] if args.recipes_file else []),
    ]  # fmt: skip
    release_gpu_memory()  # the worker gets the card as a fresh process would
    started = time.monotonic()
    lines = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as worker:
        for line in worker.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))
    wall = time.monotonic() - started
    row = {"shape": target.label, "recipe": recipe.name, "setting": setting.label(), "steps": args.e2e_steps}
    row.update(exit_code=worker.returncode, wall_s=round(wall, 2), **split_phases(lines, wall))
    if worker.returncode:
        row["log_tail"] = [text for _, text in lines[-20:]]
    log.info("end to end %s: %s", recipe.name, {k: v for k, v in row.items() if k != "log_tail"})
    return row


LOADED_MARK = "trainable parameters by part"  # run.prepare_stage logs it once the model is wrapped


def split_phases(lines: list[tuple[float, str]], wall: float) -> dict:
    """Seconds of a worker run by phase, from (arrival time, line) pairs of its merged output.

    import_s: to the first stage's start (Python, torch, the worker's checks); then per stage,
    summed over stages: load_s to the wrapped model, first_step_s to the first step's progress
    event (data set, trainer, compilation, the first step), train_s over the remaining steps,
    save_s to the stage's end (the adapter or merged model written); exit_s to the process's end.
    """
    from src.contract.progress import parse_line

    phases = dict.fromkeys(("import_s", "load_s", "first_step_s", "train_s", "save_s"), 0.0)
    stage_start = loaded = first_step = last_step = None
    last_end = 0.0
    for at, text in lines:
        event = parse_line(text) or {}
        kind = event.get("event")
        if kind == "stage_start" and event.get("stage") not in ("eval", "baseline"):
            stage_start, loaded, first_step, last_step = at, None, None, None
            if not phases["import_s"]:
                phases["import_s"] = at
        elif LOADED_MARK in text and stage_start is not None and loaded is None:
            loaded = at
            phases["load_s"] += at - stage_start
        elif kind == "step" and loaded is not None:
            if first_step is None:
                first_step = at
                phases["first_step_s"] += at - loaded
            last_step = at
        elif kind == "stage_end" and last_step is not None:
            phases["train_s"] += last_step - first_step
            phases["save_s"] += at - last_step
            last_end = at
    phases["exit_s"] = wall - last_end if last_end else None
    return {key: round_or_none(value, 2) for key, value in phases.items()}
