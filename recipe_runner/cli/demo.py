"""`recipe-run demo` (`make demo`): build the offline fixtures once (a tiny Qwen2-VL pretrained to see
shapes, and shifted data where it fails zero-shot), then launch every recipe on them, on free GPUs if there
are any, else on the CPU, and write the report.

    recipe-run demo [--recipes all] [--max-steps 250] [--cpu]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from recipe_runner.cli.common import add_device_flags, add_fault_flags, add_output_flags
from recipe_runner.host.gpus import GpuInfo, NvmlUnavailable, probe_gpus
from recipe_runner.planning.request import DEFAULT_MAX_JOBS_PER_GPU

HELP = (
    "build the offline fixtures if missing (a tiny model pretrained to see shapes), fine-tune every recipe "
    "on shifted data, evaluate, report"
)
# The demo fine-tunes the pretrained tiny detector on the shifted target domain: 250 steps of batch 8
# at a rate that suits a 1M-parameter model (the recipes' own rates are for 2B-7B models). Measured
# on 2 CPU cores: about 4 minutes for the four recipes at once; see the README's example report.
DEMO_MAX_STEPS, DEMO_LEARNING_RATE, DEMO_BATCH_SIZE = 250, 3e-3, 8
# --lr-search: five rates around the demo's own, a factor of 3 apart (the recipes' own rates, 1e-4 and 2e-4,
# are for 2B-7B models), the same for every recipe.
DEMO_GRID = "3.3e-4,1e-3,3e-3,9e-3,2.7e-2"


class FixturesFailed(RuntimeError):
    """Building the fixtures failed: the demo ends with exit 1."""


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixtures", default="fixtures", metavar="DIR", help="where the tiny model and data live")
    p.add_argument("--recipes", default="all", metavar="R[,R...]", help="default all")
    p.add_argument(
        "--max-steps", type=int, default=DEMO_MAX_STEPS, metavar="N", help=f"default {DEMO_MAX_STEPS}"
    )
    p.add_argument(
        "--lr-search",
        action="store_true",
        help=f"each recipe at its own best rate of {DEMO_GRID}, chosen on a validation split by successive "
        "halving, scored once on the test split (`make demo-search`)",
    )
    p.add_argument(
        "--lr-grid", metavar="LR[,LR...]", help=f"with --lr-search: the rates (default {DEMO_GRID})"
    )
    add_device_flags(p, DEFAULT_MAX_JOBS_PER_GPU)
    add_output_flags(p)
    add_fault_flags(p)


def launch_argv(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> list[str]:
    """Build (or keep) the fixtures, then the `recipe-run launch` argv that runs the demo on them."""
    fixtures = Path(args.fixtures)
    model, data = fixtures / "tiny-qwen2-vl", fixtures / "data"
    # Always asked: it keeps fixtures built with the same settings, and rebuilds stale ones.
    print(
        f"recipe-run demo: offline fixtures in {fixtures}/ (built once, about 3 minutes on 2 cores)",
        flush=True,
    )
    built = subprocess.run([sys.executable, "-m", "src.fixtures", "--out", str(fixtures)], check=False)
    if built.returncode != 0:
        raise FixturesFailed(f"recipe-run demo: building the fixtures failed (exit {built.returncode})")
    launch = ["launch", "--recipes", args.recipes, "--model-id", str(model), "--dataset", str(data)]
    launch += ["--max-steps", str(args.max_steps)]
    if args.lr_search:
        launch += ["--lr-search", "--lr-grid", args.lr_grid or DEMO_GRID]
    else:
        launch += ["--learning-rate", str(DEMO_LEARNING_RATE)]
    launch += ["--batch-size", str(DEMO_BATCH_SIZE), "--no-wandb", "--output-dir", args.output_dir]
    launch += ["--grace", str(args.grace), *_device(args, probe), *(["--plain"] if args.plain else [])]
    print(f"recipe-run demo: recipe-run {shlex.join(launch)}", flush=True)
    return launch


def _device(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]]) -> list[str]:
    """Free GPUs when there are any, else the CPU: the demo must run anywhere."""
    threads = ["--threads", str(args.threads)] if args.threads else []
    if args.cpu:
        return ["--cpu", *threads]
    gpu_flags = ["--max-used-mib", str(args.max_used_mib)]
    gpu_flags += ["--gpus-per-recipe", str(args.gpus_per_recipe)] if args.gpus_per_recipe else []
    gpu_flags += ["--wait"] if args.wait else []
    if args.gpus is not None:
        return ["--gpus", args.gpus, *gpu_flags]
    try:
        free = [gpu for gpu in probe() if gpu.is_free(args.max_used_mib)]
    except NvmlUnavailable:
        free = []
    if len(free) >= (args.gpus_per_recipe or 1):
        return ["--gpus", "auto", *gpu_flags]
    print("recipe-run demo: no free GPU here, running on the CPU", flush=True)
    return ["--cpu", *threads]
