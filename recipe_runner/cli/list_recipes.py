"""`recipe-run list`: the recipes (built in, and from --recipes-file) and what each trains, how.

recipe-run list --recipes-file examples/r5.toml
"""

from __future__ import annotations

import argparse

from recipe_runner.cli.common import add_recipes_file_flag, print_rows, use_recipes_file
from src.recipes import RECIPE_SOURCES, RECIPES, alias_of

NAME = "list"
HELP = "list the recipes and what each trains"


def add_flags(p: argparse.ArgumentParser) -> None:
    add_recipes_file_flag(p)


def run(args: argparse.Namespace) -> int:
    use_recipes_file(args)
    rows = [("alias", "recipe", "trains (how)", "stages", "from", "description")]
    for key, recipe in RECIPES.items():
        stages = " -> ".join(stage.name for stage in recipe.stages) or "-"
        source = RECIPE_SOURCES[key].name if key in RECIPE_SOURCES else "built-in"
        rows.append((alias_of(key) or "-", key, recipe.how(), stages, source, recipe.description))
    print_rows(rows)
    return 0
