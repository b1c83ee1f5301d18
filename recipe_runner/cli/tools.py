"""`recipe-run eval`, `bench` and `export`: the torch tools, each run in its own process with the rest of the
command line, so that the launcher itself never loads torch (`recipe-run eval --help` lists its flags).
"""

from __future__ import annotations

import subprocess
import sys

MODULES = {  # subcommand -> (the module it runs, what it does)
    "eval": (
        "src.eval.evaluate",
        "evaluate worker output directories on a test split (runs python -m src.eval.evaluate; "
        "`recipe-run eval --help` lists its flags)",
    ),
    "bench": (
        "src.bench",
        "tokens/s, step time, peak memory, MFU of every recipe beside the plain loop, on 2B/7B "
        "random-weight models (runs python -m src.bench; `recipe-run bench --help` lists its flags)",
    ),
    "export": (
        "src.export",
        "the chosen recipe (default: the report's winner by F1@0.5) as a standalone bf16 model folder, "
        "adapter merged (runs python -m src.export; `recipe-run export --help` lists its flags)",
    ),
}


def run(name: str, rest: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", MODULES[name][0], *rest])
