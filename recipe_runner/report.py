"""The side-by-side report of one launch: which recipe won, by how much, at what cost.

    recipe-run report LAUNCH_DIR        (also written at the end of every launch)

Reads what the launch left on disk: `summary.json`, and in each recipe's directory the worker's
`status.json`, `loss_history.jsonl`, `metrics.json` and `predictions.jsonl`; the zero-shot baseline
comes from `LAUNCH_DIR/base/metrics.json` (one per data set in a data-set sweep: `base-<data>/`) when
it was evaluated. Writes `report.md`, `report.json`,
`loss.png` (every recipe's training loss on one plot) and `predictions_<recipe>.png` (held-out images,
ground truth in green, predictions in red). Torch-free; matplotlib is imported only to draw.
"""

from __future__ import annotations

import json
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
CELL_PX, GRID_COLUMNS, GRID_IMAGES = 224, 4, 8
TRUTH_RGB, PREDICTION_RGB = (0, 170, 0), (220, 0, 0)


@dataclass
class RecipeRow:
    recipe: str  # the job's name: the recipe key, or recipe-<data>-seed<N> in a sweep
    status: str
    metrics: dict = field(default_factory=dict)
    gain: dict = field(default_factory=dict)  # metric minus the base's, where both exist
    trainable_params: int | None = None
    wall_s: float | None = None
    gpu_hours: float | None = None
    peak_gpu_mem_gib: float | None = None
    final_loss: float | None = None
    output_dir: str = ""
    error: str | None = None
    recipe_key: str = ""  # the recipe itself, shared by every seed of a sweep
    seed: int | None = None
    dataset: str | None = None


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
        wall_s=wall,
        gpu_hours=round(wall * gpus / 3600, 4) if wall and gpus else None,
        peak_gpu_mem_gib=status.get("peak_gpu_mem_gib"),
        final_loss=job.get("final_loss"),
        output_dir=str(out),
        error=job.get("error") or status.get("error"),
    )


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
    return {
        "launch_id": summary.get("launch_id"),
        "launch_dir": str(launch_dir),
        "base": base_for(bases, None) if len(bases) == 1 else {},
        "bases": bases,
        "recipes": [asdict(r) for r in rows],
        "best": best_per_metric(rows),
        "over_seeds": over_seeds(rows),
    }


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
    titles = [title for _, title in METRICS]
    head = [
        "recipe",
        "status",
        *titles,
        "trainable params",
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
            + " | 0 | - | - | - | - |"
        )
    for row in rows:
        cells = [
            f"`{row['recipe']}`",
            row["status"],
            *(_metric_cell(row, k) for k, _ in METRICS),
            _fmt(row["trainable_params"]),
            _fmt(row["wall_s"], 1) + (" s" if row["wall_s"] else ""),
            _fmt(row["gpu_hours"], 4),
            _fmt(row["peak_gpu_mem_gib"], 2),
            _fmt(row["final_loss"], 4),
        ]
        lines.append("| " + " | ".join(cells) + " |")
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


def _over_seeds_table(groups: list[dict]) -> list[str]:
    if not groups:
        return []
    titles = [title for _, title in METRICS]
    lines = [
        "",
        "Over seeds (mean ± standard deviation of the seeds that succeeded):",
        "",
        "| recipe | data set | seeds | " + " | ".join(titles) + " |",
        "|" + " --- |" * (3 + len(titles)),
    ]
    for group in groups:
        cells = [
            f"{group['metrics'][k]['mean']:.3f} ± {group['metrics'][k]['std']:.3f}"
            if k in group["metrics"]
            else "-"
            for k, _ in METRICS
        ]
        seeds = f"{group['succeeded']}/{len(group['seeds'])} ({','.join(map(str, group['seeds']))})"
        lines.append(
            f"| `{group['recipe']}` | {group['dataset'] or '-'} | {seeds} | " + " | ".join(cells) + " |"
        )
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
