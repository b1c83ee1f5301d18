"""The side-by-side report of one launch: which recipe won, by how much, at what cost.

    recipe-run report LAUNCH_DIR        (also written at the end of every launch)

Reads what the launch left on disk: `summary.json`, and in each recipe's directory the worker's
`status.json`, `loss_history.jsonl`, `metrics.json` and `predictions.jsonl`; the zero-shot baseline
comes from `LAUNCH_DIR/base/metrics.json` (one per data set in a data-set sweep: `base-<data>/`) when
it was evaluated. Writes `report.md`, `report.json`,
`loss.png` (every recipe's training loss on one plot) and `predictions_<recipe>.png` (held-out images,
ground truth in green, predictions in red). Torch-free; matplotlib is imported only to draw, numpy only
to bootstrap.

From each predictions.jsonl it adds (src/scoring/bootstrap.py): a 95% interval of every headline metric by
bootstrap over the test images; a verdict per data set, the winner's paired difference against the
runner-up and against the zero-shot base on the same resampled images ("clear" when the interval of the
F1 difference to the runner-up excludes 0); with --seeds, the image bootstrap of each recipe's seed mean
beside the seed spread, the verdict then comparing seed means; and F1 by label and by COCO box size.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recipe_runner.planning.jobs import BASELINE_DIR
from recipe_runner.results.report_markdown import METRICS, RESAMPLES, render_markdown
from recipe_runner.results.report_plots import plot_loss, plot_predictions, read_jsonl
from recipe_runner.results.report_search import plot_search, search_of
from src.scoring.winner import HEADLINE, best
from src.utils.files import read_json, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class RecipeRow:
    recipe: str  # the job's name: the recipe key, or recipe-<data>-seed<N> in a sweep
    status: str
    metrics: dict = field(default_factory=dict)
    gain: dict = field(default_factory=dict)  # metric minus the base's, where both exist
    trainable_params: int | None = None
    lora: dict = field(default_factory=dict)  # {"rank", "alpha", "dropout"} it trained with (status.json)
    wall_s: float | None = None
    gpu_hours: float | None = None
    peak_gpu_mem_gib: float | None = None
    # A packed job's GPU memory reservation (GiB) beside what its allocator held at its peak (summary.json)
    reservation_gib: float | None = None
    peak_gpu_reserved_gib: float | None = None
    over_reservation_gib: float | None = None
    final_loss: float | None = None
    output_dir: str = ""
    error: str | None = None
    eval_error: str | None = None  # it trained, but its evaluation failed (status.json "eval"): no metrics
    recipe_key: str = ""  # the recipe itself, shared by every seed of a sweep
    seed: int | None = None
    dataset: str | None = None
    images: int | None = None  # test images in its predictions.jsonl
    intervals: dict = field(default_factory=dict)  # {metric: {value, low, high}}, from predictions.jsonl
    per_label: dict = field(default_factory=dict)  # {label: {precision, recall, f1, support}}
    per_size: dict = field(default_factory=dict)  # {small|medium|large: {precision, recall, f1, support}}


def _headline_metrics(metrics: dict | None) -> dict:
    return {key: metrics[key] for key, _ in METRICS if metrics and isinstance(metrics.get(key), int | float)}


def recipe_row(job: dict, base: dict) -> RecipeRow:
    """One summary.json job, enriched with what its worker wrote."""
    out = Path(job["output_dir"])
    status = read_json(out / "status.json", {}) or {}
    metrics = _headline_metrics(read_json(out / "metrics.json"))
    stages = status.get("stages") or []
    trainable = sum(sum(s.get("trainable", {}).values()) for s in stages) or None
    wall = job.get("duration_s")
    gpus = len(job.get("gpu_uuids") or [])
    return RecipeRow(
        recipe=job.get("name") or job["recipe"],
        recipe_key=job["recipe"],
        seed=job.get("seed"),
        dataset=job.get("dataset"),
        status=job["status"],
        metrics=metrics,
        gain={k: round(v - base[k], 4) for k, v in metrics.items() if k in base},
        trainable_params=trainable,
        lora=status.get("lora") or {},
        wall_s=wall,
        gpu_hours=round(wall * gpus / 3600, 4) if wall and gpus else None,
        peak_gpu_mem_gib=status.get("peak_gpu_mem_gib"),
        reservation_gib=job.get("reservation_gib"),
        peak_gpu_reserved_gib=job.get("peak_gpu_reserved_gib"),
        over_reservation_gib=job.get("over_reservation_gib"),
        final_loss=job.get("final_loss"),
        output_dir=str(out),
        error=job.get("error") or status.get("error"),
        eval_error=_eval_error(status),
    )


def _eval_error(status: dict) -> str | None:
    evaluation = status.get("eval") or {}
    return (evaluation.get("error") or "unknown error") if evaluation.get("status") == "failed" else None


def best_per_metric(rows: list[RecipeRow]) -> dict[str, str]:
    """For each metric, the succeeded recipe with the highest value (ties: the first in launch order)."""
    found = {}
    for key, _ in METRICS:
        scored = [(r.recipe, r.metrics[key]) for r in rows if r.status == "succeeded" and key in r.metrics]
        if (name := best(scored)) is not None:
            found[key] = name
    return found


def build_report(launch_dir: Path) -> dict:
    summary = read_json(launch_dir / "summary.json")
    if not isinstance(summary, dict) or "jobs" not in summary:
        raise FileNotFoundError(f"{launch_dir}: no summary.json; pass the directory a launch created")
    bases = baselines(launch_dir)
    rows = [recipe_row(job, base_for(bases, job.get("dataset"))) for job in summary["jobs"]]
    groups = over_seeds(rows)
    report = {
        "launch_id": summary.get("launch_id"),
        "launch_dir": str(launch_dir),
        "base": base_for(bases, None) if len(bases) == 1 else {},
        "bases": bases,
        "recipes": [asdict(r) for r in rows],
        "best": best_per_metric(rows),
        "over_seeds": groups,
        "base_intervals": {},
        "base_breakdown": {},
        "verdicts": [],
        "splits": summary.get("splits"),
        "search": search_of(launch_dir),
    }
    try:  # the intervals add to the report; a problem there must not cost the rest of it
        add_statistics(report, launch_dir, rows, groups)
    except Exception as error:  # noqa: BLE001 - reported in report.json and the log, never silent
        log.exception("no intervals for %s", launch_dir)
        report["statistics_error"] = f"{type(error).__name__}: {error}"
    return report


def _scores(predictions_path: Path):
    """ImageScores of one predictions.jsonl, or None where there is none."""
    from src.scoring.bootstrap import ImageScores

    rows = read_jsonl(predictions_path)
    return ImageScores.from_rows(rows) if rows else None


def _breakdown(predictions_path: Path) -> tuple[dict, dict]:
    """(per_label, per_size) P/R/F1 of one predictions.jsonl (src.scoring.metrics, as metrics.json has)."""
    from src.scoring.bootstrap import samples_from_rows
    from src.scoring.metrics import detection_metrics

    rows = read_jsonl(predictions_path)
    if not rows:
        return {}, {}
    metrics = detection_metrics(samples_from_rows(rows)[1])
    return metrics["per_label"], metrics["per_size"]


def base_dirs(launch_dir: Path) -> dict[str, Path]:
    """The baseline directory of each data set, keyed as `baselines` keys them."""
    found = {}
    for path in sorted(launch_dir.glob(f"{BASELINE_DIR}*/metrics.json")):
        dataset = ((read_json(path) or {}).get("eval") or {}).get("dataset") or path.parent.name
        found[str(dataset)] = path.parent
    return found


def add_statistics(report: dict, launch_dir: Path, rows: list[RecipeRow], groups: list[dict]) -> None:
    """Intervals, breakdowns and verdicts from every predictions.jsonl, into `report` (see the docstring)."""
    from src.scoring.bootstrap import intervals

    scores = {}
    for row, entry in zip(rows, report["recipes"], strict=True):
        predictions = Path(row.output_dir) / "predictions.jsonl"
        if row.status != "succeeded" or (found := _scores(predictions)) is None:
            continue
        scores[row.recipe] = found
        entry["images"] = len(found.keys)
        entry["intervals"] = intervals([found], RESAMPLES)
        entry["per_label"], entry["per_size"] = _breakdown(predictions)
    base_scores = {}
    for dataset, directory in base_dirs(launch_dir).items():
        if (found := _scores(directory / "predictions.jsonl")) is not None:
            base_scores[dataset] = found
            report["base_intervals"][dataset] = {"images": len(found.keys), **intervals([found], RESAMPLES)}
            per_label, per_size = _breakdown(directory / "predictions.jsonl")
            report["base_breakdown"][dataset] = {"per_label": per_label, "per_size": per_size}
    for group in groups:
        if members := _members(group, rows, scores):
            group["intervals"] = intervals(members, RESAMPLES)
    report["verdicts"] = verdicts(_entries(rows, groups, scores), base_scores, over_seeds=bool(groups))


def _members(group: dict, rows: list[RecipeRow], scores: dict) -> list:
    """The scores of a seed group's succeeded seeds."""
    return [
        scores[r.recipe]
        for r in rows
        if r.recipe_key == group["recipe"] and r.dataset == group["dataset"] and r.recipe in scores
    ]


def _entries(
    rows: list[RecipeRow], groups: list[dict], scores: dict
) -> dict[str | None, list[tuple[str, list]]]:
    """What competes, per data set: (name, scores of its seeds): the recipes' seed groups in a seed
    sweep (compared by their seed means), else each job alone."""
    entries: dict[str | None, list[tuple[str, list]]] = {}
    if groups:
        for group in groups:
            if members := _members(group, rows, scores):
                entries.setdefault(group["dataset"], []).append((group["recipe"], members))
    else:
        for row in rows:
            if row.recipe in scores:
                entries.setdefault(row.dataset, []).append((row.recipe, [scores[row.recipe]]))
    return entries


def verdicts(entries: dict, base_scores: dict, over_seeds: bool = False) -> list[dict]:
    """Per data set: the winner by F1 and its paired bootstrap difference against the runner-up and the
    base; "clear" when the first of those differences is significantly above 0."""
    import numpy as np

    from src.scoring.bootstrap import entry_values, paired_difference

    def f1_of(members: list) -> float:
        return float(entry_values(members, np.ones((1, len(members[0].keys))))[HEADLINE][0])

    out = []
    for dataset, candidates in entries.items():
        ranked = sorted(candidates, key=lambda c: -f1_of(c[1]))  # stable: ties keep launch order
        (winner, members), others = ranked[0], ranked[1:]
        against = [("runner-up", others[0][0], others[0][1])] if others else []
        if base := base_for(base_scores, dataset):
            against.append(("base", "base (zero-shot)", [base]))
        comparisons = [
            {"against": role, "name": name, "difference": paired_difference(members, other, RESAMPLES)}
            for role, name, other in against
        ]
        decisive = comparisons[0]["difference"].get(HEADLINE) if comparisons else None
        out.append(
            {
                "dataset": dataset,
                "metric": HEADLINE,
                "winner": winner,
                "winner_f1": f1_of(members),
                "over_seeds": over_seeds,
                "seeds": len(members),
                "comparisons": comparisons,
                "clear": bool(decisive and decisive["significant"] and decisive["difference"] > 0),
                "resamples": RESAMPLES,
            }
        )
    return out


def baselines(launch_dir: Path) -> dict[str, dict]:
    """The untrained model's headline metrics per data set, from LAUNCH_DIR/base*/metrics.json."""
    found = {}
    for path in sorted(launch_dir.glob(f"{BASELINE_DIR}*/metrics.json")):
        metrics = read_json(path) or {}
        dataset = (metrics.get("eval") or {}).get("dataset") or path.parent.name
        found[str(dataset)] = _headline_metrics(metrics)
    return found


def base_for(bases: dict[str, dict], dataset: str | None) -> dict:
    """The baseline of a job's data set (its only one when the job used the worker's default)."""
    if dataset is not None and dataset in bases:
        return bases[dataset]
    return next(iter(bases.values())) if len(bases) == 1 else {}


def over_seeds(rows: list[RecipeRow]) -> list[dict]:
    """Mean and spread (population standard deviation) of each metric per recipe and data set,
    over the seeds that succeeded; only where a sweep ran more than one seed."""
    groups: dict[tuple[str, str | None], list[RecipeRow]] = {}
    for row in rows:
        groups.setdefault((row.recipe_key, row.dataset), []).append(row)
    out = []
    for (recipe, dataset), members in groups.items():
        if len({m.seed for m in members}) < 2:
            continue
        done = [m for m in members if m.status == "succeeded" and m.metrics]
        stats = {}
        for key, _ in METRICS:
            values = [m.metrics[key] for m in done if key in m.metrics]
            if values:
                stats[key] = {
                    "mean": round(statistics.fmean(values), 4),
                    "std": round(statistics.pstdev(values), 4),
                    "n": len(values),
                }
        out.append(
            {
                "recipe": recipe,
                "dataset": dataset,
                "seeds": sorted(m.seed for m in members if m.seed is not None),
                "succeeded": len(done),
                "metrics": stats,
            }
        )
    return out


def write_report(launch_dir: str | Path) -> list[Path]:
    """Write report.md, report.json and the pictures; returns the paths written."""
    launch_dir = Path(launch_dir)
    report = build_report(launch_dir)
    pictures = []
    if plot_loss(launch_dir, report["recipes"], launch_dir / "loss.png"):
        pictures.append("loss.png")
    for row in report["recipes"]:
        name = f"predictions_{row['recipe']}.png"
        if plot_predictions(read_jsonl(Path(row["output_dir"]) / "predictions.jsonl"), launch_dir / name):
            pictures.append(name)
    if report.get("search") and plot_search(report["search"], launch_dir / "search.png"):
        pictures.append("search.png")
    report["pictures"] = pictures
    write_json_atomic(launch_dir / "report.json", report)
    markdown = write_text_atomic(launch_dir / "report.md", render_markdown(report, pictures))
    return [markdown, launch_dir / "report.json", *(launch_dir / p for p in pictures)]
