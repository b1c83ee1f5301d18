"""The flags of `recipe-run` and their checks: the argparse tree, and each problem named with its fix.

recipe_runner/cli.py parses with `parse_args` and runs the subcommand; this module holds what a user
types (every subcommand's flags, the examples of --help) and `validate_launch`, which names every bad
flag before anything starts (exit 2 through UsageError). Imports no torch, like the whole launcher.
"""

from __future__ import annotations

import argparse
import difflib

from recipe_runner.gpus import DEFAULT_MAX_USED_MIB
from recipe_runner.lora_flags import LORA_RANGES, lora_problems
from recipe_runner.memory import AUTO_EFFECTIVE_BATCH
from recipe_runner.placement import (
    DEFAULT_MAX_JOBS_PER_GPU,
)
from recipe_runner.plan import (
    SweepPoint,
    parse_gpu_ids,
    resolve_recipes,
    sweep_points,
)
from src.recipes import recipes_file_problems
from src.training.offload import flag_problems as offload_flag_problems
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
        help="torch.compile each decoder layer and vision block (auto: for stages of 500+ steps on a GPU)",
    )
    train.add_argument(
        "--dequantize-once",
        choices=["auto", "on", "off"],
        help="QLoRA stages: keep bf16 copies of the 4-bit weights, dequantized once (faster, more memory; "
        "auto: where they fit; off: the smallest memory)",
    )
    train.add_argument(
        "--offload-activations",
        action="store_true",
        help="recompute on, and the blocks' saved inputs wait in host memory: the least GPU memory at a "
        "larger micro-batch (7B r4, 8x2 compiled: 17.9 GiB, 1.42 s a step; not offloaded 19.7 GiB, 1.32 s)",
    )
    train.add_argument(
        "--skip-bad-records", action="store_true", help="drop invalid records instead of failing"
    )
    train.add_argument(
        "--save-steps", type=int, metavar="N", help="checkpoint every N steps, for `recipe-run resume`"
    )
    train.add_argument(
        "--logging-steps",
        type=int,
        metavar="N",
        help="log the loss every N steps (default: 10 on a GPU, where each read is a host sync that leaves "
        "the GPU idle; every step on the CPU); the progress table still moves every step",
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
    if problems := recipes_file_problems(path):
        raise UsageError(
            f"--recipes-file {path}:\n  " + "\n  ".join(problems),
            "fix the file (the schema: src/recipes.toml); nothing was started or written",
        )


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
    device.add_argument(
        "--pin-cpus",
        choices=["auto", "off"],
        default="auto",
        help="auto (default): each GPU gets its own share of the CPU cores, nearest it first, and its "
        "workers run only there, so recipes on different GPUs never slow each other's host side; "
        "off: workers run on any core",
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


def parse_args(argv: list[str]) -> argparse.Namespace:
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
    problems += offload_flag_problems(
        getattr(args, "offload_activations", False), getattr(args, "gradient_checkpointing", None)
    )
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


def sweep_of_args(args: argparse.Namespace) -> list[SweepPoint]:
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
        ("--logging-steps", getattr(args, "logging_steps", None), lambda v: v >= 1, "at least 1"),
        ("--oom-retries", args.oom_retries, lambda v: v >= 0, "0 or more"),
        ("--hang-timeout", args.hang_timeout, lambda v: v >= 0, "0 (off) or more seconds"),
    ]
    return [
        f"{flag} {value}: must be {want}"
        for flag, value, ok, want in checks
        if value is not None and not ok(value)
    ]
