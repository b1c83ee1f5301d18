"""The launcher stays light: importing any recipe_runner module loads no torch and no transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

PROBE = """
import importlib, json, pkgutil, sys
import recipe_runner
names = [m.name for m in pkgutil.walk_packages(recipe_runner.__path__, "recipe_runner.")]
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"modules": names, "heavy": heavy}))
"""


def test_no_recipe_runner_module_imports_torch_or_transformers() -> None:
    # A fresh interpreter: this test process may have imported torch for other tests.
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    found = json.loads(done.stdout)
    every_layer = {
        "recipe_runner.__main__",
        "recipe_runner.cli.main",
        "recipe_runner.backends.loop",
        "recipe_runner.backends.local",
        "recipe_runner.backends.ray",
        "recipe_runner.results.report",
        "recipe_runner.planning.placement",
        "recipe_runner.host.gpus",
    }
    assert every_layer <= set(found["modules"])
    assert found["heavy"] == []


HELP = """
import runpy, sys
sys.argv = ["recipe-run", "--help"]
try:
    runpy.run_module("recipe_runner", run_name="__main__")
except SystemExit:
    pass
print("TORCH" if "torch" in sys.modules else "NO-TORCH")
"""


def test_help_answers_without_loading_ml_libraries() -> None:
    done = subprocess.run([sys.executable, "-c", HELP], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "examples:" in done.stdout and done.stdout.rstrip().endswith("NO-TORCH")


def test_the_console_script_points_at_the_entry_function() -> None:
    # `recipe-run` is installed from pyproject's [project.scripts]; a module moved under it breaks it.
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["recipe-run"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    installed = Path(sys.executable).parent / "recipe-run"  # make install's, where the suite runs from it
    if installed.exists():
        done = subprocess.run([installed, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "examples:" in done.stdout, done.stderr
