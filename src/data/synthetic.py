"""A synthetic detection data set: coloured shapes with labels and pixel boxes.

Written to disk in the Hugging Face `imagefolder` layout that `src.data.dataset` loads:

    OUT/train/metadata.jsonl, OUT/train/000000.png, ...
    OUT/test/metadata.jsonl,  OUT/test/000000.png, ...

one JSON line per image: {"file_name": ..., "objects": {"bbox": [[x1, y1, x2, y2], ...], "label": [...]}}
with boxes in pixels (x1, y1 top-left, x2, y2 bottom-right), and OUT/synthetic.json with the
settings it was written with. Two domains: "source" (plain shapes on flat backgrounds) and "target"
(the same shapes in other colours on noisy, textured backgrounds), so a model pretrained on one can
be fine-tuned on the other (`src.models.pretrain` does the first half for the demo).
Deterministic: the same arguments write byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SETTINGS_FILE = "synthetic.json"

DOMAINS = {
    "source": {"colours": ("red", "green", "blue"), "shapes": ("circle", "square", "triangle"), "noise": 0},
    # The demo's target: the same shapes in colours the source never shows (each a mix of two source
    # colours, far apart from one another), on noisy checkered backgrounds. New colour words make a
    # source-trained base fail zero-shot (it names every object in a source colour) while what it
    # learnt about shapes and positions still helps.
    "target": {
        "colours": ("yellow", "purple", "cyan"),
        "shapes": ("circle", "square", "triangle"),
        "noise": 30,
    },
}
RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 60, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "cyan": (30, 190, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")  # what _draw_shape can draw


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    elif shape == "cross":
        w, h = (x2 - x1) // 3, (y2 - y1) // 3
        draw.rectangle((x1, cy - h // 2, x2, cy + h // 2), fill=fill)
        draw.rectangle((cx - w // 2, y1, cx + w // 2, y2), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, fill=fill)
        inset = max(2, (x2 - x1) // 4)
        draw.ellipse((x1 + inset, y1 + inset, x2 - inset, y2 - inset), fill=(0, 0, 0, 0))


def _background(rng: random.Random, size: tuple[int, int], noise: int):
    import numpy as np
    from PIL import Image

    base = tuple(rng.randint(200, 255) for _ in range(3))
    if not noise:
        return Image.new("RGB", size, base)
    width, height = size
    noise_rng = np.random.default_rng(rng.getrandbits(32))  # seeded from rng: same seed, same image
    ys, xs = np.mgrid[0:height, 0:width]
    stripe = np.where((xs // 8 + ys // 8) % 2 == 1, 25, 0)[..., None]  # a checker texture under the noise
    pixels = (
        np.array(base)[None, None, :] - stripe + noise_rng.integers(-noise, noise + 1, (height, width, 3))
    )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _place_boxes(
    rng: random.Random, count: int, size: tuple[int, int], side: tuple[float, float] = (0.2, 0.45)
) -> list[tuple[int, int, int, int]]:
    """Non-overlapping square boxes, each side[0]-side[1] of the image's shorter side."""
    width, height = size
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(count * 20):
        if len(boxes) == count:
            break
        side_px = rng.randint(int(side[0] * min(size)), int(side[1] * min(size)))
        x1, y1 = rng.randint(0, width - side_px), rng.randint(0, height - side_px)
        box = (x1, y1, x1 + side_px, y1 + side_px)
        if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in boxes):
            boxes.append(box)
    return boxes


def make_image(
    rng: random.Random,
    domain: str,
    size: tuple[int, int] = (112, 112),
    max_objects: int = 2,
    side: tuple[float, float] = (0.2, 0.45),
):
    """One image and its objects as (label, box) pairs."""
    from PIL import ImageDraw

    spec = DOMAINS[domain]
    image = _background(rng, size, spec["noise"])
    background = image.copy()
    draw = ImageDraw.Draw(image)
    objects = []
    for box in _place_boxes(rng, rng.randint(1, max_objects), size, side):
        colour, shape = rng.choice(spec["colours"]), rng.choice(spec["shapes"])
        _draw_shape(draw, shape, box, RGB[colour])
        objects.append((f"{colour} {shape}", box))
    if any(label.endswith("ring") for label, _ in objects):
        image = _punch_rings(image, background, objects)
    return image, objects


def _punch_rings(image, background, objects):
    # A ring's hole shows the background, not a flat colour.
    from PIL import Image, ImageDraw

    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    for label, (x1, y1, x2, y2) in objects:
        if label.endswith("ring"):
            inset = max(2, (x2 - x1) // 4)
            draw.ellipse((x1 + inset, y1 + inset, x2 - inset, y2 - inset), fill=255)
    return Image.composite(background, image, mask)


def write_split(
    out_dir: Path, count: int, domain: str, seed: int, size=(112, 112), max_objects=2, side=(0.2, 0.45)
) -> Path:
    """Write `count` images and metadata.jsonl into out_dir; returns the metadata path."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        image, objects = make_image(rng, domain, size, max_objects, side)
        name = f"{index:06d}.png"
        image.save(out_dir / name)
        lines.append(
            {
                "file_name": name,
                "objects": {
                    "bbox": [list(box) for _, box in objects],
                    "label": [label for label, _ in objects],
                },
            }
        )
    metadata = out_dir / "metadata.jsonl"
    metadata.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return metadata


def write_dataset(
    out_dir: str | Path,
    train: int = 32,
    test: int = 16,
    domain: str = "source",
    seed: int = 0,
    size=(112, 112),
    max_objects: int = 2,
    side: tuple[float, float] = (0.2, 0.45),
) -> Path:
    """A train and a test split of one domain under out_dir; objects per image 1..max_objects.

    OUT/synthetic.json records the arguments, so a cache can tell whether it holds what is asked.
    """
    out = Path(out_dir)
    write_split(out / "train", train, domain, seed, size, max_objects, side)
    write_split(out / "test", test, domain, seed + 1, size, max_objects, side)
    (out / SETTINGS_FILE).write_text(
        json.dumps(dataset_settings(train, test, domain, seed, size, max_objects, side), sort_keys=True)
        + "\n"
    )
    return out


def dataset_settings(train, test, domain, seed, size, max_objects, side) -> dict:
    """What write_dataset records in synthetic.json (JSON-normalised, so it compares equal when re-read)."""
    return json.loads(
        json.dumps(
            {
                "train": train,
                "test": test,
                "domain": domain,
                "spec": DOMAINS[domain],
                "seed": seed,
                "size": list(size),
                "max_objects": max_objects,
                "side": list(side),
            }
        )
    )
