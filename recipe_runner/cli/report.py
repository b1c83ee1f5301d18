"""`recipe-run report LAUNCH_DIR`: the side-by-side report of a finished launch again (every launch writes
it when it ends): report.md, report.json and the pictures.
"""

from __future__ import annotations

import argparse

from recipe_runner.cli.common import UsageError
from recipe_runner.results.report import write_report

HELP = "write the side-by-side report of a finished launch (done after every launch too)"


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("launch_dir", metavar="LAUNCH_DIR", help="<output-dir>/<launch-id> of a launch")


def run(args: argparse.Namespace) -> int:
    try:
        written = write_report(args.launch_dir)
    except FileNotFoundError as error:
        raise UsageError(
            str(error), "pass the <output-dir>/<launch-id> directory that a launch created"
        ) from None
    for path in written:
        print(path)
    return 0
