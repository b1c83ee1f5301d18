"""`make lint`'s import contracts (pyproject's [tool.importlinter]) hold, and they bite: a layer violation
or an import cycle planted in a copy of the code fails `lint-imports`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="lint-imports is not installed (make install)")


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300
    )


def copy_of_the_code(tmp_path: Path) -> Path:
    for name in ("recipe_runner", "src"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def plant(tree: Path, module: str, line: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_code_keeps_every_contract(tmp_path):
    done = lint(copy_of_the_code(tmp_path))
    assert done.returncode == 0 and "0 broken" in done.stdout, done.stdout[-2000:]


def test_a_lower_layer_importing_a_higher_one_fails(tmp_path):
    tree = copy_of_the_code(tmp_path)
    plant(tree, "recipe_runner/host/gpus.py", "import recipe_runner.cli.main  # planted")
    done = lint(tree)
    assert done.returncode != 0 and "what it runs on at the bottom BROKEN" in done.stdout, done.stdout[-2000:]


def test_an_import_cycle_fails(tmp_path):
    tree = copy_of_the_code(tmp_path)
    plant(tree, "src/contract/exits.py", "import src.contract.flags  # planted")
    plant(tree, "src/contract/flags.py", "import src.contract.exits  # planted")
    done = lint(tree)
    assert done.returncode != 0 and "No import cycles, at any depth BROKEN" in done.stdout, done.stdout
