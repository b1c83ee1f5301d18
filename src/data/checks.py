"""Checks of a run's inputs that need no model and no torch: shared by the worker and the launcher.

The launcher runs them once before it starts anything, so that bad input gets one clear message
and exit code 2 with nothing written; each worker runs them again, since it can be run alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from src.contract.families import family_problem


def model_and_data_problems(
    model_id: str,
    dataset: str,
    skip_bad_records: bool = False,
    image_root: str | None = None,
    evaluate: bool = True,
    val_fraction: float = 0.0,
) -> list[str]:
    """A local model of a family we do not train; a data set that is missing, empty or has bad records.
    With `val_fraction` above 0 the validation split is checked too (too few images to carve it, say).

    With `evaluate` (the default: a run evaluates after training unless --skip-eval) the test split is
    checked too, so that a data set with nothing to test on (one image and no test split) or a bad test
    record stops the run before any model loads, not after every recipe has trained.
    """
    from src.contract.flags import DEFAULT_DATASET
    from src.data.dataset import load_records
    from src.data.records import DatasetError

    problems = []
    if problem := local_model_problem(model_id):
        problems.append(problem)
    if dataset == DEFAULT_DATASET and not Path(dataset).exists():
        return [
            *problems,
            f"--dataset not given, and the default {DEFAULT_DATASET} does not exist: build it "
            "with `python -m src.fixtures` (or `make fixtures`), or pass --dataset DIR|FILE.json|HUB_NAME",
        ]
    splits = ["train", *(["validation"] if val_fraction > 0 else []), *(["test"] if evaluate else [])]
    for split in splits:
        try:
            load_records(dataset, split, skip_bad_records, image_root, val_fraction)
        except DatasetError as error:
            problems.append(str(error))
            if "bad record" not in str(error):
                break  # the source itself is unusable: its test split would say the same again
    return problems


def output_dir_problems(output: Path, resume: bool = False, flag: str = "--output-dir") -> list[str]:
    """An output directory must be new (or empty) and writable; with resume it must hold a run."""
    if resume:
        if not (output / "status.json").is_file():
            return [f"--resume: {output} holds no earlier run (no status.json); drop --resume"]
        return []
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        return [f"{flag} {output}: exists and is not empty; choose a new directory, or --resume it"]
    return writable_problems(output, flag)


def writable_problems(path: Path, flag: str) -> list[str]:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return [f"{flag} {path}: not writable ({existing}); choose a directory you can write to"]
    return []


def local_model_problem(model_id: str) -> str | None:
    """Why a local model path cannot be used (None when fine, or when it is a hub id)."""
    path = Path(model_id)
    looks_local = path.is_absolute() or model_id.startswith(".") or path.exists()
    if not looks_local:
        return None
    config = path / "config.json"
    if not config.is_file():
        return f"--model-id {model_id}: no config.json there; pass a model directory or a hub id"
    model_type = json.loads(config.read_text()).get("model_type")
    problem = family_problem(model_type)
    if problem:
        return f"--model-id {model_id}: {problem}; pass a model directory of one of those"
    return None
