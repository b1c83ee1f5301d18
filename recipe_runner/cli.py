"""recipe-run: run the fine-tuning recipes, one worker process per recipe on its own GPU(s).

    recipe-run --recipes r1,r2,r4 --gpus 0,1,2      # same as `recipe-run launch ...`
    python -m recipe_runner plan --recipes all        # what would run where; starts nothing

Subcommands (a literal list, `COMMANDS`): launch (the default), plan, list, gpus, demo, report,
resume, eval, bench, export (eval, bench and export run their torch modules in a child process).
`recipe-run --help` explains with examples. Exit codes: 0 every recipe succeeded, 1 any did not,
2 bad usage or unusable GPUs (nothing started, nothing written), 130 Ctrl-C, 143 SIGTERM.

Environment: RECIPE_RUNNER_LEASE_DIR (leases.py). Testing hooks: RECIPE_RUNNER_FAKE_GPUS
(gpus.py) fakes NVML, RECIPE_RUNNER_WORKER (plan.py) replaces the worker command.

This module imports no torch and no transformers, so that --help and plan answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from recipe_runner.execute import GpuPool, RunPolicy, run_jobs
from recipe_runner.gpus import DEFAULT_MAX_USED_MIB, GpuInfo, NvmlUnavailable, probe_gpus
from recipe_runner.leases import lease_dir, reservations
from recipe_runner.lora_flags import LORA_RANGES, lora_problems, lora_sizes_from_args
from recipe_runner.memory import AUTO_EFFECTIVE_BATCH
from recipe_runner.placement import (
    DEFAULT_MAX_JOBS_PER_GPU,
    LaunchRequest,
    Plan,
    PlanError,
    jobs_per_gpu,
    make_plan,
    plan_recipes,
)
from recipe_runner.plan import (
    WORKER_ENV,
    GpuSelection,
    JobSpec,
    SweepPoint,
    TrainFlags,
    as_cpu_job,
    flag_value,
    new_launch_id,
    parse_gpu_ids,
    resolve_recipes,
    resume_spec,
    select_gpus,
    split_threads,
    sweep_points,
    worker_command,
)
from recipe_runner.plan_view import plan_for_sizes, print_plan, print_rows
from recipe_runner.status import LiveReporter, PlainReporter
from recipe_runner.summary import (
    JobResult,
    launch_exit_code,
    read_summary,
    render_summary,
    write_summary,
)
from src.recipes import RECIPE_SOURCES, RECIPES, RecipeFileError, alias_of, use_recipes_file
from src.utils.args import int_or_auto

COMMANDS = ("launch", "plan", "list", "gpus", "demo", "report", "resume", "eval", "bench", "export")
# The demo fine-tunes the pretrained tiny detector on the shifted target domain: 250 steps of batch 8
# at a rate that suits a 1M-parameter model (the recipes' own rates are for 2B-7B models). Measured
# on 2 CPU cores: about 4 minutes for the four recipes at once; see the README's example report.
DEMO_MAX_STEPS, DEMO_LEARNING_RATE, DEMO_BATCH_SIZE = 250, 3e-3, 8

EXAMPLES = """\
examples:
  recipe-run --recipes r1,r2,r4 --gpus 0,1,2        three recipes, one GPU each, at once
  recipe-run --recipes all --gpus auto --wait         every recipe on the free GPUs, queueing
  recipe-run --recipes r3 --gpus 0 --model-id Qwen/Qwen2-VL-2B-Instruct --dataset data/train.json
  recipe-run --recipes r4 --gpus 0,1 --gpus-per-recipe 2     one model sharded over two GPUs
  recipe-run --recipes r1,r3 --cpu --max-steps 5      on the CPU, threads split between recipes
  recipe-run plan --recipes all                       which recipe goes where, commands, env
  recipe-run gpus                                     what NVML sees, which GPUs are free
  recipe-run list                                     the recipes and what each trains
  recipe-run --recipes-file my.toml --recipes r4,r5   recipes of your own beside the built-in ones
  recipe-run demo                                     tiny offline model and data, all four recipes
  recipe-run report outputs/20261126-041500-ab12      the side-by-side report of a launch again
  recipe-run bench --shape 7b --shape 2b              tokens/s, memory, MFU per recipe vs the plain loop
  recipe-run export outputs/20261126-041500-ab12 --out winner/   the winner as a standalone model

Recipes: r1 (r1-llm-only), r2 (r2-vision-only), r3 (r3-two-stage), r4 (r4-joint), or all; more
from --recipes-file FILE (TOML, the schema of src/recipes.toml; README.md, 'Your own recipes').
Each run writes <output-dir>/<launch-id>/: one directory per recipe (the worker's output),
logs/<recipe>.log, and summary.json. Exit: 0 all succeeded, 1 some failed, 2 bad usage,
130 interrupted. GPU leases live in $RECIPE_RUNNER_LEASE_DIR (default /tmp/recipe-runner-leases).
Every flag of a subcommand: recipe-run launch --help (plan, demo and gpus alike).
"""


class UsageError(Exception):
    """Bad usage or an unusable host: reported in one message with its fix, exit 2."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, f"see '{self.prog} --help'")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = _Parser(
        prog="recipe-run",
        usage="recipe-run [launch] --recipes R[,R...] [--gpus IDS|auto | --cpu] [options]\n"
        "       recipe-run {plan,list,gpus,demo} [options]",
        description="Run Qwen2-VL fine-tuning recipes, one worker process per recipe on its own GPU(s).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=_Parser, prog="recipe-run"
    )
    helps = {
        "launch": "run recipes and wait for them (the default: `recipe-run --recipes ...` is launch)",
        "plan": "show which recipe goes to which GPU, with command and env; start nothing",
        "list": "list the recipes and what each trains",
        "gpus": "show the GPUs NVML sees and which are free",
        "demo": "build the offline fixtures if missing (a tiny model pretrained to see shapes), fine-tune "
        "every recipe on shifted data, evaluate, report",
        "report": "write the side-by-side report of a finished launch (done after every launch too)",
        "resume": "re-run the recipes of a launch that did not succeed, each from its last checkpoint",
        "eval": "evaluate worker output directories on a test split (runs python -m src.eval.evaluate; "
        "`recipe-run eval --help` lists its flags)",
        "bench": "tokens/s, step time, peak memory, MFU of every recipe beside the plain loop, on 2B/7B "
        "random-weight models (runs python -m src.bench; `recipe-run bench --help` lists its flags)",
        "export": "the chosen recipe (default: the report's winner by F1@0.5) as a standalone bf16 model "
        "folder, adapter merged (runs python -m src.export; `recipe-run export --help` lists its flags)",
    }
    subs = {
        name: sub.add_parser(
            name,
            help=text,
            description=text,
            allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for name, text in helps.items()
    }
    for name in ("launch", "plan"):
        _add_launch_args(subs[name])
    _add_recipes_file_arg(subs["list"])
    subs["plan"].add_argument(
        "--gpu-memory",
        type=float,
        action="append",
        metavar="GIB",
        help="plan for a GPU of this many GiB instead of this host's (repeat for several; no GPU or NVML "
        "needed): each recipe's predicted peak, whether it fits, and what --batch-size auto would run",
    )
    subs["launch"].add_argument("--dry-run", action="store_true", help="same as the plan subcommand")
    _add_gpus_args(subs["gpus"])
    _add_demo_args(subs["demo"])
    subs["report"].add_argument(
        "launch_dir", metavar="LAUNCH_DIR", help="<output-dir>/<launch-id> of a launch"
    )
    subs["resume"].add_argument(
        "launch_dir", metavar="LAUNCH_DIR", help="<output-dir>/<launch-id> of an earlier launch"
    )
    _add_device_args(subs["resume"])
    _add_fault_args(subs["resume"])
    subs["resume"].add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    return parser, subs


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes", metavar="R[,R...]", help="recipes by key or alias (r1..r4), or all; required")
    _add_recipes_file_arg(p)
    _add_device_args(p)
    _add_backend_args(p)
    _add_run_args(p)
    train = p.add_argument_group("training flags, passed to every worker (default: the worker's)")
    train.add_argument("--model-id", metavar="ID", help="hub id or local directory")
    train.add_argument("--dataset", metavar="PATH", help="imagefolder dir, COCO json, or hub name")
    train.add_argument("--epochs", type=float, metavar="N", help="training epochs per stage")
    train.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps per stage")
    train.add_argument(
        "--batch-size",
        type=int_or_auto,
        metavar="N|auto",
        help=f"per-device micro-batch; auto: the largest that the memory planner fits on the GPU, with "
        f"accumulation keeping {AUTO_EFFECTIVE_BATCH} samples a step",
    )
    train.add_argument("--grad-accum", type=int, metavar="N", help="gradient accumulation steps")
    train.add_argument("--learning-rate", type=float, metavar="LR", help="default: each recipe's own")
    train.add_argument("--seed", type=int, metavar="N")
    sweep = p.add_argument_group("sweeps: every recipe runs once per seed and data set")
    sweep.add_argument("--seeds", metavar="S[,S...]", help="e.g. 0,1,2; the report gives mean and spread")
    sweep.add_argument("--datasets", metavar="D[,D...]", help="several data sets, compared side by side")
    train.add_argument(
        "--gradient-checkpointing",
        choices=["auto", "on", "off"],
        help="recompute activations (auto: only where the planner says they would not fit)",
    )
    train.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        help="torch.compile each decoder layer and vision block (auto: for stages of 1000+ steps on a GPU)",
    )
    train.add_argument(
        "--skip-bad-records", action="store_true", help="drop invalid records instead of failing"
    )
    train.add_argument(
        "--save-steps", type=int, metavar="N", help="checkpoint every N steps, for `recipe-run resume`"
    )
    train.add_argument(
        "--eval-samples",
        type=int,
        metavar="N",
        help="cap the test images each worker evaluates (default: all)",
    )
    train.add_argument(
        "--skip-eval", action="store_true", help="no evaluation after training (and no zero-shot baseline)"
    )
    train.add_argument("--no-wandb", action="store_true", help="turn W&B logging off")
    train.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help="resize images to at most N pixels (default: the processor's own, capped at 1,003,520 = 1280 "
        "image tokens; the hub's Qwen2-VL would allow 16,384 tokens an image)",
    )
    train.add_argument("--min-pixels", type=int, metavar="N", help="resize images to at least N pixels")
    train.add_argument(
        "--image-root",
        metavar="DIR",
        help="where the images are, when not beside the annotation file, in images/ or (COCO) in <split>/",
    )
    lora = p.add_argument_group("LoRA size (default: each recipe's rank 16, alpha 32, dropout 0.05)")
    lora.add_argument("--lora-rank", type=int, metavar="R", help="rank for every recipe")
    lora.add_argument("--lora-alpha", type=int, metavar="A", help="alpha for every recipe")
    lora.add_argument("--lora-dropout", type=float, metavar="P", help="dropout for every recipe")
    lora.add_argument(
        "--lora",
        action="append",
        metavar="[RECIPE:]KEY=V[,KEY=V]",
        help="LoRA sizes for one recipe, e.g. r4:rank=64,alpha=128 (keys: rank, alpha, dropout); repeat "
        "for several; without RECIPE: for every recipe",
    )


def _add_recipes_file_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipes-file",
        metavar="FILE",
        help="a TOML file of recipes of your own, added to the built-in ones (the schema of "
        "src/recipes.toml; see README.md, 'Your own recipes'); checked before anything starts",
    )


def use_recipes_file_arg(args: argparse.Namespace) -> None:
    """Add --recipes-file's recipes to the registry; UsageError (exit 2, nothing written) on a bad one."""
    path = getattr(args, "recipes_file", None)
    if path is None:
        return
    try:
        use_recipes_file(path)
    except RecipeFileError as error:
        raise UsageError(
            f"--recipes-file {path}:\n  " + "\n  ".join(error.problems),
            "fix the file (the schema: src/recipes.toml); nothing was started or written",
        ) from None


def _add_device_args(p: argparse.ArgumentParser) -> None:
    device = p.add_argument_group("devices")
    device.add_argument(
        "--gpus",
        metavar="IDS",
        help="NVML indices as nvidia-smi shows them (0,1,2), or auto (default): every free GPU",
    )
    device.add_argument(
        "--gpus-per-recipe",
        type=int,
        metavar="N",
        help="GPUs per recipe: N data-parallel processes when the model fits one GPU, else one model "
        "sharded over N GPUs. Default: 1, and GPUs left over when they outnumber the recipes go to the "
        "longest recipes as data parallel",
    )
    device.add_argument(
        "--shard",
        action="store_true",
        help="with --gpus-per-recipe N: shard one model over the N GPUs instead of data parallel",
    )
    device.add_argument(
        "--pack",
        choices=["auto", "off"],
        default="auto",
        help="auto (default): several recipes share a GPU while their planned peaks fit its memory; "
        "off: one recipe per GPU, the rest queue",
    )
    device.add_argument(
        "--max-jobs-per-gpu",
        type=int,
        default=DEFAULT_MAX_JOBS_PER_GPU,
        metavar="N",
        help=f"with --pack auto: at most N recipes on one GPU (default {DEFAULT_MAX_JOBS_PER_GPU})",
    )
    device.add_argument(
        "--max-used-mib",
        type=int,
        default=DEFAULT_MAX_USED_MIB,
        metavar="MIB",
        help=f"a GPU with this much memory in use counts as busy (default {DEFAULT_MAX_USED_MIB})",
    )
    device.add_argument(
        "--wait", action="store_true", help="queue until busy GPUs free up instead of exiting 2"
    )
    device.add_argument("--cpu", action="store_true", help="train on the CPU, all recipes at once")
    device.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU cores to split between the recipes running at once (default: all)",
    )


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    backend = p.add_argument_group("backend")
    backend.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local (default): subprocesses on this host; ray: the Ray cluster at --ray-address",
    )
    backend.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="with --backend ray: HEAD:6379, auto, or ray://HEAD:10001 "
        "(default $RAY_ADDRESS, else a local Ray)",
    )
    backend.add_argument(
        "--ray-retries",
        type=int,
        default=0,
        metavar="N",
        help="with --backend ray: rerun a recipe whose node was lost, N times (default 0)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("run")
    run.add_argument(
        "--output-dir", default="outputs", metavar="DIR", help="root of the launch (default outputs)"
    )
    run.add_argument("--plain", action="store_true", help="plain lines even on a terminal (no live table)")
    _add_fault_args(p)


def _add_fault_args(p: argparse.ArgumentParser) -> None:
    faults = p.add_argument_group("faults")
    faults.add_argument(
        "--grace", type=float, default=30.0, metavar="S", help="after Ctrl-C, seconds before SIGKILL"
    )
    faults.add_argument(
        "--oom-retries",
        type=int,
        default=2,
        metavar="N",
        help="re-run a recipe that ran out of GPU memory with half the micro-batch and twice the "
        "accumulation, up to N times (default 2)",
    )
    faults.add_argument(
        "--hang-timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="report a recipe that printed nothing for S seconds (default 1800; 0: never)",
    )
    faults.add_argument("--kill-hung", action="store_true", help="also end such a recipe")


def _add_gpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-used-mib", type=int, default=DEFAULT_MAX_USED_MIB, metavar="MIB", help="busy threshold"
    )
    p.add_argument("--json", action="store_true", help="JSON records instead of a table")


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixtures", default="fixtures", metavar="DIR", help="where the tiny model and data live")
    p.add_argument("--recipes", default="all", metavar="R[,R...]", help="default all")
    p.add_argument(
        "--max-steps", type=int, default=DEMO_MAX_STEPS, metavar="N", help=f"default {DEMO_MAX_STEPS}"
    )
    _add_device_args(p)
    _add_run_args(p)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        return cmd_eval(argv[1:])
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    if argv[:1] == ["export"]:
        return cmd_export(argv[1:])
    try:
        args = _parse(argv)
        return _COMMANDS[args.command](args)
    except UsageError as error:
        print(f"recipe-run: error: {error}", file=sys.stderr)
        if error.hint:
            print(f"  {error.hint}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except KeyboardInterrupt:
        return 130


def _parse(argv: list[str]) -> argparse.Namespace:
    parser, subs = build_parser()
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        if argv and not argv[0].startswith("-"):
            raise UsageError(
                f"unknown subcommand {argv[0]!r}; choose from {', '.join(COMMANDS)}",
                "see 'recipe-run --help'",
            )
        argv = ["launch", *argv]
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise UsageError(_unrecognized(extra, subs[args.command]), f"see 'recipe-run {args.command} --help'")
    args.argv = argv
    return args


def _unrecognized(extra: list[str], parser: argparse.ArgumentParser) -> str:
    known = [opt for action in parser._actions for opt in action.option_strings]
    message = f"unrecognized arguments: {' '.join(extra)}"
    for word in extra:
        close = (
            difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.8)
            if word.startswith("--")
            else []
        )
        if close:
            message += f" (did you mean {close[0]}?)"
    return message


def validate_launch(args: argparse.Namespace) -> list[str]:
    """Every problem with the launch flags, each naming its flag; empty when they are fine."""
    problems = []
    if not args.recipes:
        problems.append(
            "--recipes is required: name them like --recipes r1,r2 or --recipes all (see 'recipe-run list')"
        )
    else:
        try:
            resolve_recipes(args.recipes)
        except ValueError as error:
            problems.append(f"--recipes: {error}")
    # `--gpus auto --cpu` is allowed: auto is the default, and `make all-recipes ARGS=--cpu` passes both.
    if args.cpu and args.gpus is not None and args.gpus.strip().lower() != "auto":
        problems.append("--cpu and --gpus exclude each other: drop one")
    if args.gpus is not None:
        try:
            parse_gpu_ids(args.gpus)
        except ValueError as error:
            problems.append(str(error))
    if args.cpu and args.gpus_per_recipe not in (None, 1):
        problems.append("--gpus-per-recipe does not apply to --cpu")
    if args.shard and (args.gpus_per_recipe or 1) < 2:
        problems.append("--shard needs --gpus-per-recipe 2 or more: it splits one model over several GPUs")
    if getattr(args, "batch_size", None) == "auto" and (args.cpu or args.backend == "ray" or args.shard):
        problems.append(
            "--batch-size auto plans against one local GPU's memory: give --batch-size N with --cpu, "
            "--backend ray or --shard"
        )
    sizes = getattr(args, "gpu_memory", None) or []
    problems += [
        f"--gpu-memory {gib:g}: give a size in GiB above 0, like 24 or 80" for gib in sizes if gib <= 0
    ]
    problems += _backend_problems(args)
    problems += _sweep_problems(args)
    if args.recipes and not any("--recipes" in p for p in problems):
        problems += lora_problems(args)
    problems += _range_problems(args)
    return problems


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give whole numbers like 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give distinct whole numbers of 0 or more, like 0,1,2")
    return seeds


def parse_datasets(text: str) -> list[str]:
    datasets = [part.strip() for part in text.split(",") if part.strip()]
    if not datasets or len(set(datasets)) != len(datasets):
        raise ValueError(f"--datasets {text!r}: give distinct data sets, like data/a,data/b")
    return datasets


def _sweep_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    for flag, value, single, parse in (
        ("--seeds", args.seeds, args.seed, parse_seeds),
        ("--datasets", args.datasets, args.dataset, parse_datasets),
    ):
        if value is None:
            continue
        if single is not None:
            problems.append(f"{flag} and {flag[:-1]} exclude each other: drop one")
        try:
            parse(value)
        except ValueError as error:
            problems.append(str(error))
    return problems


def _sweep(args: argparse.Namespace) -> list[SweepPoint]:
    seeds = parse_seeds(args.seeds) if args.seeds else None
    datasets = parse_datasets(args.datasets) if args.datasets else None
    return sweep_points(seeds, datasets)


def _backend_problems(args: argparse.Namespace) -> list[str]:
    if args.backend != "ray":
        used = [
            flag
            for flag, value in (("--ray-address", args.ray_address), ("--ray-retries", args.ray_retries))
            if value
        ]
        return [f"{flag} needs --backend ray" for flag in used]
    problems = []
    if args.gpus is not None and args.gpus.strip().lower() != "auto":
        problems.append("--gpus IDS does not apply to --backend ray: Ray picks the GPUs")
    if args.ray_retries < 0:
        problems.append(f"--ray-retries {args.ray_retries}: must be 0 or more")
    if args.wait:
        problems.append("--wait does not apply to --backend ray: Ray queues recipes until GPUs free up")
    return problems


def _range_problems(args: argparse.Namespace) -> list[str]:
    checks = [
        ("--gpus-per-recipe", args.gpus_per_recipe, lambda v: v >= 1, "at least 1"),
        ("--max-jobs-per-gpu", args.max_jobs_per_gpu, lambda v: v >= 1, "at least 1"),
        ("--min-pixels", getattr(args, "min_pixels", None), lambda v: v >= 784, "at least 784 (one token)"),
        ("--max-pixels", getattr(args, "max_pixels", None), lambda v: v >= 784, "at least 784 (one token)"),
        ("--lora-rank", getattr(args, "lora_rank", None), *LORA_RANGES["rank"]),
        ("--lora-alpha", getattr(args, "lora_alpha", None), *LORA_RANGES["alpha"]),
        ("--lora-dropout", getattr(args, "lora_dropout", None), *LORA_RANGES["dropout"]),
        ("--threads", args.threads, lambda v: v >= 1, "at least 1"),
        ("--max-used-mib", args.max_used_mib, lambda v: v >= 0, "0 or more"),
        ("--grace", args.grace, lambda v: v >= 0, "0 or more seconds"),
        ("--max-steps", args.max_steps, lambda v: v >= 1 or v == -1, "at least 1, or -1 for epochs"),
        ("--epochs", getattr(args, "epochs", None), lambda v: v > 0, "above 0"),
        ("--batch-size", getattr(args, "batch_size", None), lambda v: v == "auto" or v >= 1, "at least 1"),
        ("--grad-accum", getattr(args, "grad_accum", None), lambda v: v >= 1, "at least 1"),
        ("--learning-rate", getattr(args, "learning_rate", None), lambda v: 0 < v < 1, "between 0 and 1"),
        ("--seed", getattr(args, "seed", None), lambda v: v >= 0, "0 or more"),
        ("--save-steps", getattr(args, "save_steps", None), lambda v: v >= 0, "0 (off) or more"),
        ("--oom-retries", args.oom_retries, lambda v: v >= 0, "0 or more"),
        ("--hang-timeout", args.hang_timeout, lambda v: v >= 0, "0 (off) or more seconds"),
    ]
    return [
        f"{flag} {value}: must be {want}"
        for flag, value, ok, want in checks
        if value is not None and not ok(value)
    ]


def cmd_launch(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> int:
    use_recipes_file_arg(args)
    problems = validate_launch(args)
    if problems:
        raise UsageError("\n  ".join(problems), f"see 'recipe-run {args.command} --help'")
    request = request_from_args(args)
    try:
        worker = worker_command()
    except ValueError as error:
        raise UsageError(str(error)) from None
    if problems := preflight_problems(request.flags, request.sweep, request.output_dir):
        raise UsageError("\n  ".join(problems), "fix the input above; nothing was started or written")
    if args.command == "launch" and not getattr(args, "dry_run", False):
        request = _with_local_model(request)
    if getattr(args, "gpu_memory", None):
        try:
            return plan_for_sizes(request, args.gpu_memory)
        except PlanError as error:
            raise UsageError(str(error), error.hint) from None
    launch_id = new_launch_id()
    selection = None if request.cpu or request.backend == "ray" else _select(args, probe)
    pool = _pool(args, selection, probe, launch_id) if selection else None
    try:
        plan = _make_plan(request, launch_id, worker, selection, pool)
    except PlanError as error:
        raise UsageError(str(error), error.hint) from None
    if args.command == "plan" or getattr(args, "dry_run", False):
        print_plan(plan, selection)
        return 0
    for name, memory in plan.memory.items():
        print(f"recipe-run: {name}: {memory.describe()}")
    if args.backend == "ray":
        _connect_ray(args.ray_address)
    return _execute(args, launch_id, plan.launch_dir, list(plan.jobs), selection, probe)


def _with_local_model(request: LaunchRequest) -> LaunchRequest:
    """The request with a hub model id replaced by its local snapshot, downloaded once before any worker
    starts (the workers then never download); exit 2 when it is neither cached nor downloadable."""
    from recipe_runner.memory import ModelUnavailable, local_model
    from src.training.worker import DEFAULT_MODEL

    model_id = request.flags.model_id or DEFAULT_MODEL
    if os.environ.get(WORKER_ENV) or Path(model_id).is_dir():
        return request
    print(f"recipe-run: fetching {model_id} once for every worker (the hub's cache is reused)", flush=True)
    try:
        local = local_model(model_id)
    except ModelUnavailable as error:
        raise UsageError(
            f"--model-id {model_id}: not in the local Hugging Face cache and not downloadable now ({error})",
            "go online (or log in: huggingface-cli login) and run again, or pass --model-id DIR of a local "
            "copy; nothing was started or written",
        ) from None
    return replace(request, flags=replace(request.flags, model_id=local))


def request_from_args(args: argparse.Namespace) -> LaunchRequest:
    """The launch as asked, read once from the parsed (and validated) flags."""
    return LaunchRequest(
        recipes=tuple(resolve_recipes(args.recipes)),
        flags=_train_flags(args),
        sweep=tuple(_sweep(args)),
        output_dir=Path(args.output_dir),
        cpu=args.cpu,
        threads=args.threads,
        backend=args.backend,
        gpus_per_recipe=_per_recipe(args),
        spread=args.gpus_per_recipe is None and not args.cpu and args.backend == "local",
        shard=args.shard,
        pack=args.pack,
        max_jobs_per_gpu=args.max_jobs_per_gpu,
        lora=lora_sizes_from_args(args),
    )


def _per_recipe(args: argparse.Namespace) -> int:
    return args.gpus_per_recipe or 1


def _make_plan(request, launch_id, worker, selection: GpuSelection | None, pool: GpuPool | None) -> Plan:
    """Ask the GPUs (NVML, leases) and the memory planner, then place: the launch's one pure step."""
    cores = os.cpu_count() or 1
    if selection is None or pool is None:
        return make_plan(request, launch_id, worker, None, {}, cores)
    memory = plan_recipes(request, min(gpu.memory_total_mib for gpu in selection.pool))
    return make_plan(request, launch_id, worker, pool.rooms(), memory, cores)


def _connect_ray(address: str | None) -> None:
    """Ray installed and the head reachable, or exit 2 before anything is written."""
    from recipe_runner.ray_backend import RayConnectError, RayUnavailable, check_reachable, import_ray

    try:
        import_ray()
        check_reachable(address)
    except (RayUnavailable, RayConnectError) as error:
        raise UsageError(str(error), "see README.md, 'Many machines: the Ray backend'") from None


def preflight_problems(flags: TrainFlags, sweep: Sequence[SweepPoint], output_dir: Path) -> list[str]:
    """Bad model, data or output directory, found before any worker starts (and any model loads).

    Hub ids and hub data sets are left to the workers: checking them needs a download. With the
    worker replaced (the RECIPE_RUNNER_WORKER testing hook) only the output directory is checked:
    the stand-in has its own contract.
    """
    from src.training.checks import model_and_data_problems, writable_problems
    from src.training.worker import DEFAULT_DATASET, DEFAULT_MODEL

    problems = writable_problems(output_dir, "--output-dir")
    if os.environ.get(WORKER_ENV):
        return problems
    for dataset in dict.fromkeys(point.dataset or flags.dataset or DEFAULT_DATASET for point in sweep):
        if Path(dataset).exists() or dataset.startswith((".", "/")) or dataset == DEFAULT_DATASET:
            problems += model_and_data_problems(
                flags.model_id or DEFAULT_MODEL,
                dataset,
                flags.skip_bad_records,
                image_root=flags.image_root,
                evaluate=not flags.skip_eval,
            )
    return list(dict.fromkeys(problems))


def _select(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]]) -> GpuSelection:
    try:
        gpus = probe()
    except NvmlUnavailable as error:
        raise UsageError(
            f"cannot list GPUs: {error}", "no NVIDIA driver here? To train on the CPU instead, add --cpu"
        ) from None
    asked = parse_gpu_ids(args.gpus) if args.gpus is not None else None
    leases = lease_dir()

    def held(gpu: GpuInfo) -> str | None:  # reservations that keep this launch off a GPU
        live = reservations(leases, gpu.uuid)
        blocking = live if args.pack == "off" else [r for r in live if r.exclusive]
        return "; ".join(r.note for r in blocking) or None

    def packable(gpu: GpuInfo) -> bool:  # its processes are other launchers' packed jobs
        return args.pack == "auto" and bool(reservations(leases, gpu.uuid))

    selection = select_gpus(gpus, asked, args.max_used_mib, held, _per_recipe(args), packable)
    problems = selection.problems(args.wait)
    if problems:
        raise UsageError(
            "\n  ".join(problems),
            "add --wait to queue until they free up, pick other --gpus "
            "('recipe-run gpus' shows the free ones), or use --cpu",
        )
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        print("recipe-run: note: CUDA_VISIBLE_DEVICES is ignored here; --gpus picks GPUs", file=sys.stderr)
    return selection


def _train_flags(args: argparse.Namespace) -> TrainFlags:
    return TrainFlags(
        model_id=args.model_id,
        dataset=args.dataset,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=args.learning_rate,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        compile=args.compile,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        image_root=args.image_root,
        save_steps=args.save_steps,
        eval_samples=args.eval_samples,
        recipes_file=str(Path(args.recipes_file).resolve()) if args.recipes_file else None,
        skip_bad_records=args.skip_bad_records,
        skip_eval=args.skip_eval,
        no_wandb=args.no_wandb,
    )


def _pool(args: argparse.Namespace, selection: GpuSelection, probe, launch_id: str) -> GpuPool:
    max_jobs = jobs_per_gpu(args.pack, args.max_jobs_per_gpu)
    return GpuPool(selection.pool, probe, lease_dir(), launch_id, max_jobs, args.max_used_mib)


def _execute(
    args: argparse.Namespace,
    launch_id: str,
    launch_dir: Path,
    specs: list[JobSpec],
    selection: GpuSelection | None,
    probe: Callable[[], list[GpuInfo]],
    earlier: Sequence[JobResult] = (),
) -> int:
    """Run the jobs, keeping summary.json true while they run; `earlier` are kept results of a resume."""
    launch_dir.mkdir(parents=True, exist_ok=True)
    pool = None
    if selection is not None:
        pool = _pool(args, selection, probe, launch_id)
    where = "the CPU" if pool is None else ", ".join(gpu.label for gpu in pool.gpus)
    if getattr(args, "backend", "local") == "ray":
        where = f"the Ray cluster at {args.ray_address or os.environ.get('RAY_ADDRESS') or 'a local Ray'}"
    print(
        f"recipe-run: launch {launch_id}: {len(specs)} recipe(s) on {where}; everything goes to {launch_dir}"
    )
    live = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb" and not args.plain
    reporter = LiveReporter(sys.stdout) if live else PlainReporter(sys.stdout)
    command = ["recipe-run", *args.argv]
    policy = RunPolicy(args.grace, args.oom_retries, args.hang_timeout, args.kill_hung)

    def keep_summary_true(results: list[JobResult]) -> None:
        write_summary(launch_dir, launch_id, _merge(earlier, results), None, command)

    if getattr(args, "backend", "local") == "ray":
        from recipe_runner.ray_backend import run_jobs_ray

        results, signum = run_jobs_ray(
            specs,
            reporter,
            address=args.ray_address,
            gpus_per_job=_per_recipe(args),
            cpu=args.cpu,
            grace_s=args.grace,
            retries_on_node_loss=args.ray_retries,
        )
    else:
        results, signum = run_jobs(specs, pool, reporter, policy=policy, on_change=keep_summary_true)
    results = _merge(earlier, results)
    code = launch_exit_code(results, signum)
    path = write_summary(launch_dir, launch_id, results, code, command)
    print("\n" + render_summary(results))
    print(f"\nsummary: {path}")
    _write_report(launch_dir)
    return code


def _merge(earlier: Sequence[JobResult], latest: Sequence[JobResult]) -> list[JobResult]:
    """Earlier results with the re-run ones put in their place, in the launch's order."""
    rerun = {r.name: r for r in latest}
    merged = [rerun.pop(r.name, r) for r in earlier]
    return merged + list(rerun.values())


def cmd_eval(rest: list[str]) -> int:
    """The evaluator in its own process: it loads torch and models, which the launcher never does."""
    return subprocess.call([sys.executable, "-m", "src.eval.evaluate", *rest])


def cmd_bench(rest: list[str]) -> int:
    """The benchmark in its own process, like eval: it needs torch and a GPU, the launcher neither."""
    return subprocess.call([sys.executable, "-m", "src.bench", *rest])


def cmd_export(rest: list[str]) -> int:
    """The export in its own process, like eval: it loads torch, transformers and peft; the launcher none."""
    return subprocess.call([sys.executable, "-m", "src.export", *rest])


def cmd_resume(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> int:
    """Re-run what did not succeed in LAUNCH_DIR, each from its last checkpoint, on free GPUs."""
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
    for path in dict.fromkeys(flag_value(spec.argv, "--recipes-file") for spec in specs):
        args.recipes_file = path  # the launch's own recipes, so that their stages show as before
        use_recipes_file_arg(args)
    cpu = args.cpu or all(r.threads is not None for r in todo)
    args.plain = getattr(args, "plain", False)
    if cpu:
        threads = split_threads(args.threads or os.cpu_count() or 1, len(specs))
        specs, selection = [as_cpu_job(spec, threads) for spec in specs], None
    else:
        selection = _select(args, probe)
    print(f"recipe-run: resuming {', '.join(r.name for r in todo)} of {launch_dir.name}")
    args.argv = ["resume", *args.argv[1:]]
    return _execute(args, summary["launch_id"], launch_dir, specs, selection, probe, earlier)


def _write_report(launch_dir: Path) -> None:
    """The side-by-side report; failing to write it never changes how the launch ended."""
    try:
        from recipe_runner.report import write_report  # imported late: drawing loads matplotlib

        written = write_report(launch_dir)
    except Exception as error:
        print(f"recipe-run: no report ({type(error).__name__}: {error})", file=sys.stderr)
        print(f"  once fixed: recipe-run report {launch_dir}", file=sys.stderr)
        return
    print(f"report:  {written[0]}")


def cmd_report(args: argparse.Namespace) -> int:
    from recipe_runner.report import write_report

    try:
        written = write_report(args.launch_dir)
    except FileNotFoundError as error:
        raise UsageError(
            str(error), "pass the <output-dir>/<launch-id> directory that a launch created"
        ) from None
    for path in written:
        print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    use_recipes_file_arg(args)
    rows = [("alias", "recipe", "trains (how)", "stages", "from", "description")]
    for key, recipe in RECIPES.items():
        stages = " -> ".join(stage.name for stage in recipe.stages) or "-"
        source = RECIPE_SOURCES[key].name if key in RECIPE_SOURCES else "built-in"
        rows.append((alias_of(key) or "-", key, recipe.how(), stages, source, recipe.description))
    print_rows(rows)
    return 0


def cmd_gpus(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> int:
    try:
        gpus = probe()
    except NvmlUnavailable as error:
        print(f"recipe-run: cannot list GPUs: {error}\n  no NVIDIA driver here? Recipes still run with --cpu")
        return 1
    leases = lease_dir()
    verdicts = [_verdict(gpu, args.max_used_mib, reservations(leases, gpu.uuid)) for gpu in gpus]
    if args.json:
        print(
            json.dumps(
                [
                    {**asdict(g), "free": v == "free", "verdict": v}
                    for g, v in zip(gpus, verdicts, strict=True)
                ]
            )
        )
        return 0
    rows = [("index", "name", "uuid", "memory used/total", "util", "processes", "free")]
    for gpu, verdict in zip(gpus, verdicts, strict=True):
        util = "-" if gpu.utilization_pct is None else f"{gpu.utilization_pct}%"
        procs = ",".join(map(str, gpu.processes)) or "-"
        memory = f"{gpu.memory_used_mib}/{gpu.memory_total_mib} MiB"
        rows.append((str(gpu.index), gpu.name, gpu.uuid, memory, util, procs, verdict))
    print_rows(rows)
    if not gpus:
        print("(NVML sees no GPU)")
    return 0


def _verdict(gpu: GpuInfo, max_used_mib: int, live: Sequence) -> str:
    holders = "; ".join(r.note for r in live)
    if any(r.exclusive for r in live):
        return f"no: leased ({holders})"
    if live:
        reserved = sum(r.mib for r in live) / 1024
        return f"shared: {len(live)} packed job(s), {reserved:.1f} GiB reserved ({holders})"
    busy = gpu.busy_reason(max_used_mib)
    return f"no: {busy}" if busy else "free"


def cmd_demo(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> int:
    fixtures = Path(args.fixtures)
    model, data = fixtures / "tiny-qwen2-vl", fixtures / "data"
    # Always asked: it keeps fixtures built with the same settings, and rebuilds stale ones.
    print(
        f"recipe-run demo: offline fixtures in {fixtures}/ (built once, about 3 minutes on 2 cores)",
        flush=True,
    )
    built = subprocess.run([sys.executable, "-m", "src.fixtures", "--out", str(fixtures)], check=False)
    if built.returncode != 0:
        print(f"recipe-run demo: building the fixtures failed (exit {built.returncode})", file=sys.stderr)
        return 1
    device = _demo_device(args, probe)
    launch = ["launch", "--recipes", args.recipes, "--model-id", str(model), "--dataset", str(data)]
    launch += ["--max-steps", str(args.max_steps), "--learning-rate", str(DEMO_LEARNING_RATE)]
    launch += ["--batch-size", str(DEMO_BATCH_SIZE), "--no-wandb", "--output-dir", args.output_dir]
    launch += ["--grace", str(args.grace), *device, *(["--plain"] if args.plain else [])]
    print(f"recipe-run demo: recipe-run {shlex.join(launch)}", flush=True)
    return main(launch)


def _demo_device(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]]) -> list[str]:
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
    if len(free) >= _per_recipe(args):
        return ["--gpus", "auto", *gpu_flags]
    print("recipe-run demo: no free GPU here, running on the CPU", flush=True)
    return ["--cpu", *threads]


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "launch": cmd_launch,
    "plan": cmd_launch,
    "list": cmd_list,
    "gpus": cmd_gpus,
    "demo": cmd_demo,
    "report": cmd_report,
    "resume": cmd_resume,
}


if __name__ == "__main__":
    raise SystemExit(main())
