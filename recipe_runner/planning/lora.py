"""The launcher's LoRA size flags: --lora-rank/--lora-alpha/--lora-dropout for every recipe, and
`--lora [RECIPE:]KEY=V[,KEY=V]` for one, turned into each recipe's sizes (torch-free).

    parse_lora_spec("r4:rank=64,alpha=128")   # ("r4-joint", {"rank": 64, "alpha": 128})
"""

from __future__ import annotations

import argparse

from recipe_runner.planning.request import resolve_recipes
from src.contract.flags import BY_DEST


def lora_sizes_from_args(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """recipe key -> its LoRA sizes as asked: --lora-rank/-alpha/-dropout for all, then --lora specs."""
    flags = {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
    every = {key: value for key, value in flags.items() if value is not None}
    sizes = {key: dict(every) for key in resolve_recipes(args.recipes)}
    for text in args.lora or []:
        target, values = parse_lora_spec(text)
        for key in sizes if target is None else [target]:
            if key in sizes:
                sizes[key].update(values)
    return {key: found for key, found in sizes.items() if found}


def parse_lora_spec(text: str) -> tuple[str | None, dict[str, float]]:
    """("r4-joint", {"rank": 64}) from "r4:rank=64"; (None, ...) for a spec without a recipe."""
    from src.recipes import LORA_FIELDS, resolve_recipe

    target, _, body = text.rpartition(":")
    try:
        recipe = resolve_recipe(target).name if target else None
    except KeyError as error:
        raise ValueError(f"--lora {text!r}: {error.args[0]}") from None
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, _, value = part.partition("=")
        if key not in LORA_FIELDS:
            raise ValueError(f"--lora {text!r}: unknown key {key!r}; use rank, alpha or dropout")
        try:
            values[key] = float(value) if key == "dropout" else int(value)
        except ValueError:
            raise ValueError(f"--lora {text!r}: {key}={value!r} is not a number") from None
        flag = BY_DEST[f"lora_{key}"]  # the same range as --lora-<key>
        if flag.valid is not None and not flag.valid(values[key]):
            raise ValueError(f"--lora {text!r}: {key} must be {flag.want}")
    if not values:
        raise ValueError(f"--lora {text!r}: give KEY=VALUE pairs, e.g. r4:rank=64,alpha=128")
    return recipe, values


def lora_problems(args: argparse.Namespace) -> list[str]:
    """Bad --lora specs, each naming itself (the plain --lora-* flags are range-checked with the rest)."""
    problems = []
    for text in args.lora or []:
        try:
            parse_lora_spec(text)
        except ValueError as error:
            problems.append(str(error))
    return problems
