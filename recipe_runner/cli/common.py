"""What every subcommand of `recipe-run` shares: the usage error (exit 2), the parser that raises it, the
flag groups several subcommands take (devices, faults, the recipes file), and the plain table printer.

Imports no torch, like the whole launcher.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from recipe_runner.host.gpus import DEFAULT_MAX_USED_MIB
from src.recipes import recipes_file_problems


class UsageError(Exception):
    """Bad usage or an unusable host: reported in one message with its fix, exit 2."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, f"see '{self.prog} --help'")


def unrecognized(extra: list[str], parser: argparse.ArgumentParser) -> str:
    """The unknown words, each with the closest known flag when one is close."""
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


def add_recipes_file_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipes-file",
        metavar="FILE",
        help="a TOML file of recipes of your own, added to the built-in ones (the schema of "
        "src/recipes.toml; see README.md, 'Your own recipes'); checked before anything starts",
    )


def use_recipes_file(args: argparse.Namespace) -> None:
    """Add --recipes-file's recipes to the registry; UsageError (exit 2, nothing written) on a bad one."""
    path = getattr(args, "recipes_file", None)
    if path is None:
        return
    if problems := recipes_file_problems(path):
        raise UsageError(
            f"--recipes-file {path}:\n  " + "\n  ".join(problems),
            "fix the file (the schema: src/recipes.toml); nothing was started or written",
        )


def add_device_flags(p: argparse.ArgumentParser, max_jobs_per_gpu: int) -> None:
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
        default=max_jobs_per_gpu,
        metavar="N",
        help=f"with --pack auto: at most N recipes on one GPU (default {max_jobs_per_gpu})",
    )
    add_busy_flag(device)
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


def add_busy_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--max-used-mib",
        type=int,
        default=DEFAULT_MAX_USED_MIB,
        metavar="MIB",
        help=f"a GPU with this much memory in use counts as busy (default {DEFAULT_MAX_USED_MIB})",
    )


def add_fault_flags(p: argparse.ArgumentParser) -> None:
    """What the run loop does about faults, on either backend (recipe_runner/backends/loop.py)."""
    faults = p.add_argument_group("faults (either backend)")
    faults.add_argument(
        "--grace", type=float, default=30.0, metavar="S", help="after Ctrl-C, seconds before SIGKILL"
    )
    faults.add_argument(
        "--oom-retries",
        type=int,
        default=2,
        metavar="N",
        help="re-run a recipe that ran out of GPU memory: alone on a GPU when it shared one, else with "
        "half the micro-batch and twice the accumulation; up to N times (default 2)",
    )
    faults.add_argument(
        "--hang-timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="report a recipe that printed nothing for S seconds (default 1800; 0: never)",
    )
    faults.add_argument("--kill-hung", action="store_true", help="also end such a recipe")


def add_output_flags(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("output")
    run.add_argument(
        "--output-dir", default="outputs", metavar="DIR", help="root of the launch (default outputs)"
    )
    run.add_argument("--plain", action="store_true", help="plain lines even on a terminal (no live table)")


def fault_problems(args: argparse.Namespace) -> list[str]:
    return range_problems(
        ("--grace", args.grace, lambda v: v >= 0, "0 or more seconds"),
        ("--oom-retries", args.oom_retries, lambda v: v >= 0, "0 or more"),
        ("--hang-timeout", args.hang_timeout, lambda v: v >= 0, "0 (off) or more seconds"),
    )


def range_problems(*checks) -> list[str]:
    """(flag, value, ok, what it must be) -> one problem for each value given and not ok."""
    return [
        f"{flag} {value}: must be {want}"
        for flag, value, ok, want in checks
        if value is not None and not ok(value)
    ]


def print_rows(rows: Sequence[Sequence[str]]) -> None:
    """A plain table, columns as wide as their widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def report_or_say(launch_dir: Path) -> None:
    """The side-by-side report; failing to write it never changes how the launch ended."""
    from recipe_runner.results.report import write_report  # drawing loads matplotlib: only now

    try:
        written = write_report(launch_dir)
    except Exception as error:
        print(f"recipe-run: no report ({type(error).__name__}: {error})", file=sys.stderr)
        print(f"  once fixed: recipe-run report {launch_dir}", file=sys.stderr)
        return
    print(f"report:  {written[0]}")
    print_answer(json.loads((launch_dir / "report.json").read_text()))


def print_answer(report: dict) -> None:
    """The verdict on screen when a launch ends: the winner, how sure, and (a search) the rates chosen."""
    from recipe_runner.results.report_markdown import answer_lines

    print()
    for paragraph in answer_lines(report):
        print(textwrap.fill(paragraph.replace("**", "").replace("`", ""), width=110))
    if chosen := (report.get("search") or {}).get("chosen"):
        rates = ", ".join(f"{recipe} {rate:.3g}" for recipe, rate in chosen.items())
        print(textwrap.fill(f"Learning rates chosen on the validation split: {rates}.", width=110))
