"""Export one recipe of a launch as a standalone model: its adapter merged in, bf16, processor beside it.

    python -m src.export LAUNCH_DIR --out exported/                 # the report's winner by F1@0.5
    python -m src.export LAUNCH_DIR --recipe r1 --out r1-model/     # a named recipe (job name or alias)
    recipe-run export LAUNCH_DIR --recipe best --out DIR            # the same, through the launcher

The folder written to --out loads with transformers alone, no PEFT:

    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained("exported/")      # bf16
    processor = AutoProcessor.from_pretrained("exported/")                # with the chat template

`--recipe best` (the default) takes the report's winner by F1 at IoU 0.5: `report.json`'s
`best["f1"]` when the launch has a report, else the same rule the report applies (src/scoring/winner.py)
(`best_per_metric`): the succeeded job with the highest `f1` in its `metrics.json`, ties to the first
in launch order. The recipe's final output comes from its worker's `status.json` (the worker
contract): `OUT/adapter/`, or for r3 `OUT/stage2-llm/adapter/` on top of `OUT/stage1-vision/merged/`.
The adapter's base (`adapter_config.json`'s `base_model_name_or_path`) is loaded unquantized in the
export dtype and the adapter merged into it: a QLoRA adapter (r1, r3's stage 2) was trained on a 4-bit
base, but merging into 4-bit weights would change nothing, so it goes into the full-precision base,
as evaluation applies it (src/eval/predict.py `load_for_eval`). The processor is the one saved beside
the adapter (the base's where there is none), as evaluation uses it.

Everything runs on the CPU (a merge is a few additions; 7B in bf16 needs about 16 GiB of RAM). The folder
is written to a temporary name beside --out and renamed when complete, with `recipe_runner_export.json`
saying where it came from. Exit codes: 0 written; 2 bad input, nothing written (no summary.json, an
unknown or unsucceeded recipe, no F1 to choose by, --out not empty); 1 the export itself failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from src.contract import exits
from src.scoring.winner import HEADLINE, best
from src.utils.files import atomic_dir, read_json

BEST = "best"
PROVENANCE_FILE = "recipe_runner_export.json"
DTYPES = ("bfloat16", "float32")
log = logging.getLogger("recipe-export")


class ExportError(ValueError):
    """Nothing can be exported as asked; the message names the flag and the fix."""


def read_launch(launch_dir: Path) -> dict:
    """The launch's summary.json (the list of its jobs)."""
    summary = read_json(launch_dir / "summary.json")
    if not isinstance(summary, dict) or not isinstance(summary.get("jobs"), list):
        raise ExportError(
            f"LAUNCH_DIR {launch_dir}: no readable summary.json; pass the <output-dir>/<launch-id> "
            "directory a launch created"
        )
    return summary


def job_dir(launch_dir: Path, job: dict) -> Path:
    """A job's output directory; where the launch was moved or copied, its namesake inside LAUNCH_DIR."""
    recorded = Path(job.get("output_dir") or "")
    if recorded.is_dir() and str(recorded) not in ("", "."):
        return recorded
    return launch_dir / recorded.name


def _f1(launch_dir: Path, job: dict) -> float | None:
    value = (read_json(job_dir(launch_dir, job) / "metrics.json") or {}).get(HEADLINE)
    return value if isinstance(value, int | float) else None


def winner_by_f1(launch_dir: Path, jobs: list[dict]) -> tuple[str, str]:
    """(job name, where the choice came from): report.json's best F1, else the report's rule
    (src/scoring/winner.py) on the jobs' metrics.json."""
    report = read_json(launch_dir / "report.json")
    if isinstance(report, dict) and (name := (report.get("best") or {}).get(HEADLINE)):
        return name, "report.json"
    scored = [
        (_name(job), f1)
        for job in jobs
        if job.get("status") == "succeeded" and (f1 := _f1(launch_dir, job)) is not None
    ]
    if (name := best(scored)) is None:
        raise ExportError(
            f"--recipe best: no succeeded recipe of {launch_dir} has an F1 in its metrics.json (was "
            "evaluation skipped?); name one with --recipe NAME, or evaluate first: recipe-run eval DIR"
        )
    return name, "metrics.json"


def _name(job: dict) -> str:
    return job.get("name") or job["recipe"]


def choose_job(launch_dir: Path, summary: dict, wanted: str) -> tuple[dict, str]:
    """(summary.json job, how it was chosen) for --recipe: best, a job name, a recipe key or an alias."""
    from src.recipes import ALIASES

    jobs = summary["jobs"]
    chosen_by, recipe_was_best = "named with --recipe", wanted == BEST
    if recipe_was_best:
        wanted, source = winner_by_f1(launch_dir, jobs)
        chosen_by = f"best F1@0.5 ({source})"
    matches = [job for job in jobs if _name(job) == wanted]
    matches = matches or [job for job in jobs if job.get("recipe") == ALIASES.get(wanted, wanted)]
    names = ", ".join(_name(job) for job in jobs) or "none"
    if not matches:
        stale = " (report.json's winner; rewrite it: recipe-run report LAUNCH_DIR)" if recipe_was_best else ""
        raise ExportError(f"--recipe {wanted}: not a job of this launch{stale}; choose one of: {names}")
    if len(matches) > 1:
        several = ", ".join(_name(job) for job in matches)
        raise ExportError(f"--recipe {wanted}: matches several jobs ({several}); pass one job name")
    job = matches[0]
    if job.get("status") != "succeeded":
        raise ExportError(
            f"--recipe {_name(job)}: its status is {job.get('status')!r}, only a succeeded recipe has a "
            f"model; choose another (of: {names}) or finish it first: recipe-run resume {launch_dir}"
        )
    return job, chosen_by


def model_source(output_dir: Path) -> tuple[str, str | None]:
    """(base model to load, adapter dir or None) of a finished worker output, as evaluation finds them."""
    from src.eval.evaluate import EvaluationError, final_model_of
    from src.eval.predict import resolve_model

    try:
        final = final_model_of(output_dir)
        base, adapter = resolve_model(final, output_dir)
    except (EvaluationError, ValueError) as error:
        raise ExportError(f"--recipe: {error}") from error
    if adapter is not None and _missing_local_path(base):
        raise ExportError(
            f"--recipe: {adapter} adapts {base}, which is not on this machine; put the base model at that "
            "path (or run the export where the launch ran)"
        )
    return base, adapter


def _missing_local_path(name: str) -> bool:
    """A path that is not here; a hub id (`owner/name`) is left to from_pretrained and its cache."""
    local = Path(name).is_absolute() or name.startswith(".") or name.count("/") != 1
    return local and not Path(name).exists()


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty directory; pass a new or empty directory")


def merged_model(base: str, adapter: str | None, dtype_name: str):
    """The base loaded unquantized in `dtype_name` on the CPU, the adapter (if any) merged in."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=getattr(torch, dtype_name))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    return model


def processor_dir(base: str, adapter: str | None) -> str:
    """The processor evaluation used: the one saved beside the adapter, else the base's."""
    return adapter if adapter and Path(adapter, "tokenizer_config.json").is_file() else base


def export(launch_dir: str | Path, recipe: str, out: str | Path, dtype: str = "bfloat16") -> Path:
    """Write the chosen recipe's model into `out` (see the module docstring); ExportError on bad input."""
    launch_dir, out = Path(launch_dir), Path(out)
    check_out(out)
    summary = read_launch(launch_dir)
    job, chosen_by = choose_job(launch_dir, summary, recipe)
    base, adapter = model_source(job_dir(launch_dir, job))
    from transformers import AutoProcessor  # after the checks: a refusal answers at once

    log.info(
        "exporting %s (%s): %s on %s, as %s", _name(job), chosen_by, adapter or "full model", base, dtype
    )
    started = time.time()
    model = merged_model(base, adapter, dtype)
    processor = AutoProcessor.from_pretrained(processor_dir(base, adapter))
    provenance = {
        "launch_dir": str(launch_dir),
        "launch_id": summary.get("launch_id"),
        "job": _name(job),
        "recipe": job.get("recipe"),
        "chosen_by": chosen_by,
        "f1": _f1(launch_dir, job),
        "base_model": base,
        "adapter": adapter,
        "dtype": dtype,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("wrote %s in %.1f s", out, time.time() - started)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    arg = parser.add_argument
    arg(
        "launch_dir",
        metavar="LAUNCH_DIR",
        help="a launch's directory (<output-dir>/<launch-id>, has summary.json)",
    )
    arg(
        "--recipe",
        default=BEST,
        metavar="NAME|best",
        help="best: the report's winner by F1@0.5; or a job name (r4-joint, r4-joint-seed1) or recipe "
        "alias (r4) of the launch (default: %(default)s)",
    )
    arg("--out", required=True, metavar="DIR", help="where to write the model (must be new or empty)")
    arg(
        "--dtype",
        choices=DTYPES,
        default="bfloat16",
        help="weights of the exported model (default: %(default)s; float32 only for CPU work that needs it)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = export(args.launch_dir, args.recipe, args.out, args.dtype)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return exits.USAGE
    except Exception:  # a failed export is reported with its traceback, never silent
        log.exception("export of %s failed", args.launch_dir)
        return exits.FAILED
    print(
        f"exported to {out}: load with AutoModelForImageTextToText.from_pretrained({str(out)!r})", flush=True
    )
    return exits.OK


if __name__ == "__main__":
    raise SystemExit(main())
