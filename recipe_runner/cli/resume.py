"""`recipe-run resume LAUNCH_DIR`: run again what did not succeed in a launch, each job from its last
checkpoint, on free GPUs (or the CPU, where it ran there); summary.json and the report are updated.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from recipe_runner.backends.local import LocalBackend
from recipe_runner.cli import launch
from recipe_runner.cli.common import UsageError, add_device_flags, add_fault_flags, use_recipes_file
from recipe_runner.host.gpus import GpuInfo, probe_gpus
from recipe_runner.planning.jobs import as_cpu_job, resume_spec, split_threads
from recipe_runner.planning.request import DEFAULT_MAX_JOBS_PER_GPU
from recipe_runner.results.summary import JobResult, read_summary
from src.contract.flags import flag_name, flag_value

HELP = "re-run the recipes of a launch that did not succeed, each from its last checkpoint"


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("launch_dir", metavar="LAUNCH_DIR", help="<output-dir>/<launch-id> of an earlier launch")
    add_device_flags(p, DEFAULT_MAX_JOBS_PER_GPU)
    add_fault_flags(p)
    p.add_argument("--plain", action="store_true", help="plain lines even on a terminal")


def searched_launch(args: argparse.Namespace) -> tuple[Path, list[str]] | None:
    """(launch directory, its recipe-run argv) when LAUNCH_DIR holds a learning-rate search; its study
    (search.db) keeps every trial's scores, so the search goes on from where it stopped."""
    launch_dir = Path(args.launch_dir).resolve()
    summary = read_summary(launch_dir)
    if summary is None or not (launch_dir / "search.db").is_file():
        return None
    return launch_dir, list(summary["command"][1:])


def run(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> int:
    launch_dir = Path(args.launch_dir).resolve()
    summary = read_summary(launch_dir)
    if summary is None:
        raise UsageError(f"{launch_dir}: no summary.json", "pass the <output-dir>/<launch-id> of a launch")
    earlier = [JobResult(**job) for job in summary["jobs"]]
    todo = [r for r in earlier if r.status != "succeeded"]
    if not todo:
        print(f"recipe-run: every recipe of {launch_dir.name} succeeded already; nothing to resume")
        return 0
    specs = [resume_spec(r) for r in todo]
    for path in dict.fromkeys(flag_value(spec.argv, flag_name("recipes_file")) for spec in specs):
        args.recipes_file = path  # the launch's own recipes, so that their stages show as before
        use_recipes_file(args)
    if args.cpu or all(r.threads is not None for r in todo):
        threads = split_threads(args.threads or os.cpu_count() or 1, len(specs))
        specs, backend = [as_cpu_job(spec, threads) for spec in specs], LocalBackend(None)
    else:
        selection = launch.select(args, probe)
        backend = LocalBackend(launch.gpu_pool(args, selection, probe, summary["launch_id"]))
    print(f"recipe-run: resuming {', '.join(r.name for r in todo)} of {launch_dir.name}")
    args.argv = ["resume", *args.argv[1:]]
    return launch.execute(args, summary["launch_id"], launch_dir, specs, backend, earlier)
