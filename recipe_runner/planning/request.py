"""What the user asked for, read once from the command line: the recipes, the sweep (seeds x data sets), the
training flags for every worker and how to place the jobs (`LaunchRequest`). Pure: no file, no process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from src.contract.flags import TrainFlags
from src.recipes import RECIPES, resolve_recipe

DEFAULT_MAX_JOBS_PER_GPU = 4


def resolve_recipes(text: str) -> list[str]:
    """Recipe keys from "r1,r3-two-stage" or "all", in the order given; a recipe named twice is an error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("no recipe named; use e.g. --recipes r1,r2 or --recipes all")
    keys: list[str] = []
    for name in names:
        try:
            found = list(RECIPES) if name == "all" else [resolve_recipe(name).name]
        except KeyError as error:
            raise ValueError(f"{error.args[0]}, or all") from None
        twice = [key for key in found if key in keys]
        if twice:
            raise ValueError(f"{twice[0]} is named twice; name each recipe once (or use all alone)")
        keys += found
    return keys


def parse_gpu_ids(text: str) -> list[int] | None:
    """[0, 2] from "0,2"; None for "auto" (every free GPU). ValueError otherwise."""
    if text.strip().lower() == "auto":
        return None
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--gpus {text!r}: give GPU indices like 0,1,2 or 'auto'") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"--gpus {text!r}: give GPU indices like 0,1,2 or 'auto'")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus {text!r} names a GPU twice")
    return ids


@dataclass(frozen=True)
class SweepPoint:
    """One (seed, dataset) a sweep runs every recipe at; `tag` tells its jobs apart."""

    seed: int | None = None
    dataset: str | None = None
    tag: str = ""
    data_tag: str = ""  # the data set's part of the tag, shared by its seeds


def sweep_points(seeds: Sequence[int] | None, datasets: Sequence[str] | None) -> list[SweepPoint]:
    """Every seed x dataset pair; tags only name what varies (no sweep: one untagged point)."""
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    data_list: list[str | None] = list(datasets) if datasets else [None]
    data_tags = _dataset_tags(data_list) if len(data_list) > 1 else {}
    points = []
    for dataset in data_list:
        data_tag = f"-{data_tags[dataset]}" if data_tags else ""
        for seed in seed_list:
            tag = data_tag + (f"-seed{seed}" if len(seed_list) > 1 else "")
            points.append(SweepPoint(seed, dataset, tag, data_tag))
    return points


def _dataset_tags(datasets: Sequence[str | None]) -> dict[str | None, str]:
    """Short, path-safe names for data sets: their base names, numbered where two coincide."""
    names = [
        re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(d).rstrip("/")).name).strip("._") or "data"
        for d in datasets
    ]
    if len(set(names)) < len(names):
        names = [f"d{i}-{name}" for i, name in enumerate(names)]
    return dict(zip(datasets, names, strict=True))


class PlanError(ValueError):
    """A request that cannot be placed as asked; the message names the flag, `hint` the fix."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class LaunchRequest:
    """What the user asked for, built once from the command line (cli.request_from_args)."""

    recipes: tuple[str, ...]
    flags: TrainFlags
    sweep: tuple[SweepPoint, ...] = (SweepPoint(),)
    output_dir: Path = Path("outputs")
    cpu: bool = False
    threads: int | None = None  # cores to split; None: all of this host's
    backend: str = "local"
    gpus_per_recipe: int = 1
    spread: bool = False  # --gpus-per-recipe not given: spare GPUs go to the longest jobs as data parallel
    shard: bool = False
    pack: str = "auto"  # "auto" | "off"
    max_jobs_per_gpu: int = DEFAULT_MAX_JOBS_PER_GPU
    lora: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # recipe -> {"rank": 64, ...}

    def recipe(self, key: str):
        """The recipe `key` as this launch trains it (its LoRA sizes as asked)."""
        from src.recipes import RECIPES, with_lora

        return with_lora(RECIPES[key], **self.lora.get(key, {}))

    @property
    def max_jobs(self) -> int:
        return jobs_per_gpu(self.pack, self.max_jobs_per_gpu)

    @property
    def jobs(self) -> int:
        return len(self.recipes) * len(self.sweep)


def jobs_per_gpu(pack: str, max_jobs_per_gpu: int) -> int:
    """Jobs one GPU may hold at once: --max-jobs-per-gpu when packing, one with --pack off."""
    return max_jobs_per_gpu if pack == "auto" else 1


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
