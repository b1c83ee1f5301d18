"""The side-by-side report of one launch: which recipe won, by how much, at what cost.

    recipe-run report LAUNCH_DIR        (also written at the end of every launch)

Reads what the launch left on disk: `summary.json`, and in each recipe's directory the worker's
`status.json`, `loss_history.jsonl`, `metrics.json` and `predictions.jsonl`; the zero-shot baseline
comes from `LAUNCH_DIR/base/metrics.json` (one per data set in a data-set sweep: `base-<data>/`) when
it was evaluated. Writes `report.md`, `report.json`,
`loss.png` (every recipe's training loss on one plot) and `predictions_<recipe>.png` (held-out images,
ground truth in green, predictions in red). Torch-free; matplotlib is imported only to draw, numpy only
to bootstrap.

From each predictions.jsonl it adds (src/eval/bootstrap.py): a 95% interval of every headline metric by
bootstrap over the test images; a verdict per data set, the winner's paired difference against the
runner-up and against the zero-shot base on the same resampled images ("clear" when the interval of the
F1 difference to the runner-up excludes 0); with --seeds, the image bootstrap of each recipe's seed mean
beside the seed spread, the verdict then comparing seed means; and F1 by label and by COCO box size.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recipe_runner.plan import BASELINE_DIR
from src.utils.files import read_json, write_json_atomic, write_text_atomic

# (key in metrics.json, column title); higher is better for all of them.
METRICS = (
    ("precision", "P@0.5"),
    ("recall", "R@0.5"),
    ("f1", "F1@0.5"),
    ("map_50", "mAP@0.5"),
    ("map_50_95", "mAP@[.5:.95]"),
    ("mean_iou", "mean IoU"),
    ("parse_rate", "parsed"),
)
HEADLINE = "f1"
RESAMPLES = 1000  # bootstrap resamples of the test images (fixed RNG seed: reports reproduce)
MAX_LABEL_COLUMNS = 12  # the breakdown table shows the labels with most ground truth; report.json has all
log = logging.getLogger(__name__)
CELL_PX, GRID_COLUMNS, GRID_IMAGES = 224, 4, 8
TRUTH_RGB, PREDICTION_RGB = (0, 170, 0), (220, 0, 0)


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
    final_loss: float | None = None
    output_dir: str = ""
    error: str | None = None
    recipe_key: str = ""  # the recipe itself, shared by every seed of a sweep
    seed: int | None = None
    dataset: str | None = None
    images: int | None = None  # test images in its predictions.jsonl
    intervals: dict = field(default_factory=dict)  # {metric: {value, low, high}}, from predictions.jsonl
    per_label: dict = field(default_factory=dict)  # {label: {precision, recall, f1, support}}
    per_size: dict = field(default_factory=dict)  # {small|medium|large: {precision, recall, f1, support}}


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a line cut short by a killed writer is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


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
        final_loss=job.get("final_loss"),
        output_dir=str(out),
        error=job.get("error") or status.get("error"),
    )


def _lora_cell(lora: dict) -> str:
    return f"{lora['rank']} / {lora['alpha']}" if "rank" in lora and "alpha" in lora else "-"


def best_per_metric(rows: list[RecipeRow]) -> dict[str, str]:
    """For each metric, the succeeded recipe with the highest value (ties: the first in launch order)."""
    best = {}
    for key, _ in METRICS:
        scored = [r for r in rows if r.status == "succeeded" and key in r.metrics]
        if scored:
            best[key] = max(scored, key=lambda r: r.metrics[key]).recipe
    return best


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
    }
    try:  # the intervals add to the report; a problem there must not cost the rest of it
        add_statistics(report, launch_dir, rows, groups)
    except Exception as error:  # noqa: BLE001 - reported in report.json and the log, never silent
        log.exception("no intervals for %s", launch_dir)
        report["statistics_error"] = f"{type(error).__name__}: {error}"
    return report


def _scores(predictions_path: Path):
    """ImageScores of one predictions.jsonl, or None where there is none."""
    from src.eval.bootstrap import ImageScores

    rows = _read_jsonl(predictions_path)
    return ImageScores.from_rows(rows) if rows else None


def _breakdown(predictions_path: Path) -> tuple[dict, dict]:
    """(per_label, per_size) P/R/F1 of one predictions.jsonl (src.eval.metrics, as metrics.json has)."""
    from src.eval.bootstrap import samples_from_rows
    from src.eval.metrics import detection_metrics

    rows = _read_jsonl(predictions_path)
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
    from src.eval.bootstrap import intervals

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

    from src.eval.bootstrap import entry_values, paired_difference

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
                "seeds": sorted(m.seed for m in members),
                "succeeded": len(done),
                "metrics": stats,
            }
        )
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _metric_cell(row: dict, key: str) -> str:
    if key not in row["metrics"]:
        return "-"
    gain = row["gain"].get(key)
    return _fmt(row["metrics"][key]) + (f" ({gain:+.3f})" if gain is not None else "")


def render_markdown(report: dict, pictures: list[str]) -> str:
    best, base, rows = report["best"], report["base"], report["recipes"]
    lines = [f"# Recipe comparison: launch {report['launch_id']}", ""]
    if HEADLINE in best:
        winner = next(r for r in rows if r["recipe"] == best[HEADLINE])
        gain = winner["gain"].get(HEADLINE)
        over = f", {gain:+.3f} over the zero-shot base" if gain is not None else ""
        lines.append(
            f"**Winner by F1 at IoU 0.5: `{winner['recipe']}`** ({_fmt(winner['metrics'][HEADLINE])}{over})."
        )
    else:
        lines.append("No recipe produced metrics: see the status column and each recipe's train.log.")
    for verdict in report.get("verdicts", []):
        lines += ["", verdict_sentence(verdict, len(report["verdicts"]) > 1)]
    titles = [title for _, title in METRICS]
    head = [
        "recipe",
        "status",
        *titles,
        "trainable params",
        "LoRA r / alpha",
        "wall time",
        "GPU-hours",
        "peak GPU GiB",
        "final loss",
    ]
    lines += [
        "",
        "Metrics on the held-out split; in brackets, the gain over the untrained base.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    if base:
        lines.append(
            "| base (zero-shot) | - | "
            + " | ".join(_fmt(base.get(k)) for k, _ in METRICS)
            + " | 0 | - | - | - | - | - |"
        )
    for row in rows:
        cells = [
            f"`{row['recipe']}`",
            row["status"],
            *(_metric_cell(row, k) for k, _ in METRICS),
            _fmt(row["trainable_params"]),
            _lora_cell(row.get("lora") or {}),
            _fmt(row["wall_s"], 1) + (" s" if row["wall_s"] else ""),
            _fmt(row["gpu_hours"], 4),
            _fmt(row["peak_gpu_mem_gib"], 2),
            _fmt(row["final_loss"], 4),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _intervals_table(report)
    lines += _differences_table(report)
    lines += _over_seeds_table(report["over_seeds"])
    lines += _breakdown_tables(report)
    lines += [
        "",
        "Best per metric: " + ", ".join(f"{title} `{best[k]}`" for k, title in METRICS if k in best)
        if best
        else "",
        "",
    ]
    for row in rows:
        if row["status"] != "succeeded":
            lines.append(f"- `{row['recipe']}` {row['status']}: {row['error'] or 'see its log'}")
    lines += ["", *(f"![{Path(p).stem}]({p})" for p in pictures), ""]
    return "\n".join(lines)


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _band(item: dict | None, signed: bool = False) -> str:
    """'0.952 [0.913, 0.984]' for {value, low, high}; '+0.046 [+0.012, +0.081]' for a difference."""
    if not item:
        return "-"
    show = _signed if signed else (lambda v: f"{v:.3f}")
    value = item["difference"] if "difference" in item else item["value"]
    return f"{show(value)} [{show(item['low'])}, {show(item['high'])}]"


def verdict_sentence(verdict: dict, name_dataset: bool) -> str:
    """One sentence: is the winner clear? From the paired F1 difference to the runner-up (else the base)."""
    where = f"On `{verdict['dataset']}`: " if name_dataset and verdict["dataset"] else ""
    who = f"`{verdict['winner']}`" + (" (mean over seeds)" if verdict["over_seeds"] else "")
    if not verdict["comparisons"]:
        return f"{where}{who} is the only recipe with predictions; nothing to compare it with."
    parts = []
    for comparison in verdict["comparisons"]:
        d = comparison["difference"].get(HEADLINE)
        if not d:
            continue
        other = "the zero-shot base" if comparison["against"] == "base" else f"`{comparison['name']}`"
        interval = f"95% CI [{_signed(d['low'])}, {_signed(d['high'])}]"
        if d["significant"]:
            verb = "beats" if d["difference"] > 0 else "trails"
            parts.append(f"{verb} {other} by {_signed(d['difference'])} F1 ({interval})")
        else:
            change = _signed(d["difference"])
            parts.append(f"shows no significant difference from {other} ({change} F1, {interval} includes 0)")
    images = verdict["comparisons"][0]["difference"].get(HEADLINE, {}).get("images")
    head = "**The winner is clear:**" if verdict["clear"] else "**The winner is not clear:**"
    tail = f"; paired bootstrap over {images} test images, {verdict['resamples']} resamples."
    return f"{where}{head} {who} " + " and ".join(parts) + tail


def _intervals_table(report: dict) -> list[str]:
    rows = [r for r in report["recipes"] if r.get("intervals")]
    if not rows:
        return []
    titles = [title for _, title in METRICS]
    lines = [
        "",
        f"95% intervals by bootstrap over the test images ({RESAMPLES} resamples; value [low, high]):",
        "",
        "| recipe | images | " + " | ".join(titles) + " |",
        "|" + " --- |" * (2 + len(titles)),
    ]
    for dataset, intervals in report.get("base_intervals", {}).items():
        name = "base (zero-shot)" + (f" {dataset}" if len(report["base_intervals"]) > 1 else "")
        cells = " | ".join(_band(intervals.get(k)) for k, _ in METRICS)
        lines.append(f"| {name} | {intervals.get('images', '-')} | {cells} |")
    for row in rows:
        images = row.get("images") or "-"
        cells = " | ".join(_band(row["intervals"].get(k)) for k, _ in METRICS)
        lines.append(f"| `{row['recipe']}` | {images} | {cells} |")
    return lines


def _differences_table(report: dict) -> list[str]:
    verdicts = [v for v in report.get("verdicts", []) if v["comparisons"]]
    if not verdicts:
        return []
    titles = [title for _, title in METRICS]
    lines = [
        "",
        "The winner minus the others, on the same resampled images (* : the 95% interval excludes 0):",
        "",
        "| comparison | " + " | ".join(titles) + " |",
        "|" + " --- |" * (1 + len(titles)),
    ]
    for verdict in verdicts:
        for comparison in verdict["comparisons"]:
            name = "base" if comparison["against"] == "base" else f"`{comparison['name']}`"
            cells = []
            for key, _ in METRICS:
                d = comparison["difference"].get(key)
                cells.append(_band(d, signed=True) + (" *" if d and d["significant"] else ""))
            lines.append(f"| `{verdict['winner']}` − {name} | " + " | ".join(cells) + " |")
    return lines


def _over_seeds_table(groups: list[dict]) -> list[str]:
    if not groups:
        return []
    titles = [title for _, title in METRICS]
    lines = [
        "",
        "Over seeds: mean ± standard deviation of the seeds that succeeded, then in brackets the 95%",
        "interval of that mean by bootstrap over the test images (seed spread and image sampling, apart):",
        "",
        "| recipe | data set | seeds | " + " | ".join(titles) + " |",
        "|" + " --- |" * (3 + len(titles)),
    ]
    for group in groups:
        cells = []
        for k, _ in METRICS:
            if k not in group["metrics"]:
                cells.append("-")
                continue
            band = (group.get("intervals") or {}).get(k)
            images = f" [{band['low']:.3f}, {band['high']:.3f}]" if band else ""
            cells.append(f"{group['metrics'][k]['mean']:.3f} ± {group['metrics'][k]['std']:.3f}{images}")
        seeds = f"{group['succeeded']}/{len(group['seeds'])} ({','.join(map(str, group['seeds']))})"
        lines.append(
            f"| `{group['recipe']}` | {group['dataset'] or '-'} | {seeds} | " + " | ".join(cells) + " |"
        )
    return lines


def _breakdown_rows(report: dict) -> list[tuple[str, dict, dict]]:
    """(name, per_label, per_size) of the base(s) and every recipe with predictions."""
    out = []
    for dataset, found in report.get("base_breakdown", {}).items():
        name = "base (zero-shot)" + (f" {dataset}" if len(report["base_breakdown"]) > 1 else "")
        out.append((name, found["per_label"], found["per_size"]))
    out += [
        (f"`{r['recipe']}`", r["per_label"], r["per_size"]) for r in report["recipes"] if r.get("per_size")
    ]
    return out


def _breakdown_tables(report: dict) -> list[str]:
    """F1@0.5 by label and by COCO box size, one row per model: where each recipe wins."""
    rows = _breakdown_rows(report)
    if not rows:
        return []
    support: dict[str, int] = {}
    for _, per_label, _ in rows:
        for label, item in per_label.items():
            support[label] = max(support.get(label, 0), item["support"])
    # Labels with no true box in the test split (only mistaken predictions) have no F1 worth a column.
    labels = sorted((lb for lb in support if support[lb]), key=lambda lb: (-support[lb], lb))[
        :MAX_LABEL_COLUMNS
    ]
    sizes = ("small", "medium", "large")
    size_support = {s: max(r[2].get(s, {}).get("support", 0) for r in rows) for s in sizes}

    def cell(item: dict | None) -> str:
        return f"{item['f1']:.3f}" if item and (item["support"] or item.get("predicted")) else "-"

    more = (
        f" (the {MAX_LABEL_COLUMNS} with most boxes; report.json has all)"
        if len(support) > len(labels)
        else ""
    )
    lines = [
        "",
        f"F1@0.5 by label{more}, and by box size as COCO counts it (area in pixels of the original image:",
        "small < 32², medium < 96², large above); n is the number of ground-truth boxes:",
        "",
        "| model | "
        + " | ".join(f"{label} (n={support[label]})" for label in labels)
        + " | "
        + " | ".join(f"{s} (n={size_support[s]})" for s in sizes)
        + " |",
        "|" + " --- |" * (1 + len(labels) + len(sizes)),
    ]
    for name, per_label, per_size in rows:
        cells = [cell(per_label.get(label)) for label in labels] + [cell(per_size.get(s)) for s in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot_loss(launch_dir: Path, rows: list[dict], out: Path) -> Path | None:
    """Every recipe's loss against its optimizer step (a chain's stages run one after another)."""
    curves = {}
    for row in rows:
        history = _read_jsonl(Path(row["output_dir"]) / "loss_history.jsonl")
        offset, last_stage, points = 0, None, []
        for item in history:
            if item["stage"] != last_stage and points:
                offset = points[-1][0]
            last_stage = item["stage"]
            points.append((offset + item["step"], item["loss"]))
        if points:
            curves[row["recipe"]] = points
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    for recipe, points in curves.items():
        axes.plot([p[0] for p in points], [p[1] for p in points], label=recipe)
    axes.set(xlabel="optimizer step", ylabel="training loss", title="Training loss per recipe")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out


def _draw_boxes(draw, boxes: list[dict], scale: float, colour) -> None:
    for box in boxes:
        corners = [box["x1"] * scale, box["y1"] * scale, box["x2"] * scale, box["y2"] * scale]
        draw.rectangle(corners, outline=colour, width=2)
        draw.text((corners[0] + 2, corners[1] + 1), box.get("label", ""), fill=colour)


def plot_predictions(predictions: list[dict], out: Path) -> Path | None:
    """A grid of held-out images with ground truth (green) and predicted (red) boxes."""
    from PIL import Image, ImageDraw

    shown = predictions[:GRID_IMAGES]
    if not shown:
        return None
    rows = (len(shown) + GRID_COLUMNS - 1) // GRID_COLUMNS
    grid = Image.new("RGB", (GRID_COLUMNS * CELL_PX, rows * CELL_PX), "white")
    for index, item in enumerate(shown):
        with Image.open(item["image"]) as opened:
            image = opened.convert("RGB")
        scale = CELL_PX / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        draw = ImageDraw.Draw(image)
        _draw_boxes(draw, item.get("truths", []), scale, TRUTH_RGB)
        _draw_boxes(draw, item.get("predictions", []), scale, PREDICTION_RGB)
        grid.paste(image, ((index % GRID_COLUMNS) * CELL_PX, (index // GRID_COLUMNS) * CELL_PX))
    grid.save(out)
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
        if plot_predictions(_read_jsonl(Path(row["output_dir"]) / "predictions.jsonl"), launch_dir / name):
            pictures.append(name)
    report["pictures"] = pictures
    write_json_atomic(launch_dir / "report.json", report)
    markdown = write_text_atomic(launch_dir / "report.md", render_markdown(report, pictures))
    return [markdown, launch_dir / "report.json", *(launch_dir / p for p in pictures)]
