"""The report's pictures: every recipe's training loss on one plot (loss.png), and held-out images with the
ground truth in green and a recipe's predictions in red (predictions_<recipe>.png). matplotlib and PIL are
imported only here, and only when drawing.
"""

from __future__ import annotations

import json
from pathlib import Path

CELL_PX, GRID_COLUMNS, GRID_IMAGES = 224, 4, 8


TRUTH_RGB, PREDICTION_RGB = (0, 170, 0), (220, 0, 0)


def read_jsonl(path: Path) -> list[dict]:
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


def plot_loss(launch_dir: Path, rows: list[dict], out: Path) -> Path | None:
    """Every recipe's loss against its optimizer step (a chain's stages run one after another)."""
    curves = {}
    for row in rows:
        history = read_jsonl(Path(row["output_dir"]) / "loss_history.jsonl")
        offset, last_stage = 0, None
        points: list[tuple[int, float]] = []
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
