"""The YOLO folder reader; `src.data.dataset` calls it for `--dataset DIR`.

It gives `RawRecord`s (pixel boxes [x1, y1, x2, y2] of the original image) that `dataset.py` validates
like every other source.

YOLO (Ultralytics' layout): ``DIR/data.yaml`` (``data.yml``, ``dataset.yaml``) with ``names`` (a list, or a
dict of class id -> name) and optional ``path``, ``train``, ``val``, ``test``: folders of images, lists of
folders, or .txt files listing images. An image's labels are the .txt of the same name under the last
``images/`` of its path swapped for ``labels/`` (``DIR/images/train/a.jpg`` -> ``DIR/labels/train/a.txt``),
one object a line: ``class cx cy w h`` normalised to 0-1 (a sixth value, a confidence, is ignored); a
longer line is a segmentation polygon ``class x1 y1 x2 y2 ...``, read as the box around it. No label file
means no objects. Coordinates above 1 are refused (pixels are not YOLO's format), never rescaled. Without
``train`` the images under ``DIR/images/`` are the data set. The test split is ``test``, else ``val``;
without either, images are held out as for any source without a test split.

Why not the `supervision` library's `DetectionDataset.from_yolo` / `from_pascal_voc`: version 0.31 needs
PyAV (36 MB wheel, with FFmpeg) and SciPy (35 MB) besides, for two formats read here in ~150 lines; its
VOC reader drops the `difficult` flag, decodes every image to learn its size, and its loaders stop at the
first bad file with one ValueError, where this project names every bad record and can skip them
(--skip-bad-records).
"""

from __future__ import annotations

import os
from pathlib import Path

from src.data.records import DatasetError, NoOwnSplit, RawRecord, holdout

YOLO_CONFIGS = ("data.yaml", "data.yml", "dataset.yaml")
IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}
NORMALISED_TOLERANCE = 1e-3  # YOLO exporters round; 1.0004 is still the image's edge


def yolo_config(root: Path) -> Path | None:
    return next((root / name for name in YOLO_CONFIGS if (root / name).is_file()), None)


def is_yolo(root: Path) -> bool:
    return yolo_config(root) is not None


def read_yolo(root: Path, split: str, source: str) -> list[RawRecord]:
    """The split's records of a YOLO folder (see the module docstring)."""
    config_path = yolo_config(root)
    config = _load_yaml(config_path)
    names = _yolo_names(config, config_path)
    base = _yolo_base(config, root)
    keys = {
        "train": "train",
        "test": next((key for key in ("test", "val") if config.get(key)), None),
        "validation": "val" if config.get("test") and config.get("val") else None,
    }
    if split == "validation" and not (config.get("train") and keys["validation"]):
        raise NoOwnSplit(f"{source}: no validation split of its own")
    if config.get("train") and keys["test"]:
        key = str(keys[split])
        return _yolo_records(_yolo_images(config[key], key, base, root, config_path), names, config)
    if config.get("train"):
        images = _yolo_images(config["train"], "train", base, root, config_path)
    else:
        images = _images_under(root / "images")
        if not images:
            raise DatasetError(f"{config_path}: no train entry and no images under {root / 'images'}")
    return holdout(_yolo_records(images, names, config), split, source)


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise DatasetError(f"{path}: not valid YAML ({error}); fix the file") from None
    if not isinstance(config, dict):
        raise DatasetError(f"{path}: expected a mapping with names, train and val")
    return config


def _yolo_names(config: dict, path: Path) -> list[str]:
    names = config.get("names")
    if isinstance(names, dict):
        try:
            return [str(names[key]) for key in sorted(names, key=int)]
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: names keys must be class ids 0, 1, ...; got {list(names)}") from None
    if isinstance(names, list) and names:
        return [str(name) for name in names]
    raise DatasetError(f"{path}: no names; add `names: [cat, dog, ...]` (the label of class 0, 1, ...)")


def _yolo_base(config: dict, root: Path) -> Path:
    stated = config.get("path")
    if not stated:
        return root
    base = Path(stated) if Path(stated).is_absolute() else root / stated
    return base if base.is_dir() else root  # a path from the machine it was exported on


def _yolo_images(entry, key: str, base: Path, root: Path, config_path: Path) -> list[Path]:
    images: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        relative = Path(str(item))
        # Exports often write `../train/images` relative to a parent folder that is not there.
        trimmed = Path(*[p for p in relative.parts if p not in ("..", ".")]) if relative.parts else relative
        candidates = (
            [relative] if relative.is_absolute() else [base / relative, root / relative, root / trimmed]
        )
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise DatasetError(
                f"{config_path}: {key}: {item} not found (looked for {candidates[0]}); fix the path there"
            )
        images += _images_under(found) if found.is_dir() else _listed_images(found)
    return images


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _listed_images(listing: Path) -> list[Path]:
    lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return [Path(line) if Path(line).is_absolute() else listing.parent / line for line in lines]


def yolo_label_path(image: Path) -> Path:
    """Ultralytics' rule: the last /images/ of the path becomes /labels/, the suffix .txt."""
    text = str(image)
    marker = f"{os.sep}images{os.sep}"
    if marker in text:
        head, tail = text.rsplit(marker, 1)
        text = f"{head}{os.sep}labels{os.sep}{tail}"
    return Path(text).with_suffix(".txt")


def _yolo_records(images: list[Path], names: list[str], config: dict) -> list[RawRecord]:
    keep = 5 if config.get("kpt_shape") else None  # pose rows: the box, then keypoints
    return [_yolo_record(image, names, keep) for image in images]


def _yolo_record(image: Path, names: list[str], keep: int | None) -> RawRecord:
    label_path = yolo_label_path(image)
    raw = RawRecord(image, [], [], f"{image.name} ({label_path.name})")
    if not label_path.is_file() or not image.is_file():
        return raw  # no label file: an image without objects; a missing image: validation says so
    try:
        from PIL import Image

        with Image.open(image) as opened:
            width, height = opened.size
    except Exception:  # unreadable: validation reports it before any box
        return raw
    for number, line in enumerate(label_path.read_text().splitlines(), start=1):
        values = line.split()[:keep]
        if values:
            _add_yolo_box(raw, values, f"{label_path.name} line {number}", names, width, height)
    return raw


def _add_yolo_box(raw: RawRecord, values: list[str], where: str, names: list[str], width: int, height: int):
    try:
        number = float(values[0])
        coords = [float(v) for v in values[1:]]
    except ValueError:
        raw.problems.append(f"{where}: {' '.join(values)!r} is not numbers ('class cx cy w h')")
        return
    if len(coords) < 4 or not number.is_integer() or not 0 <= number < len(names):
        problem = (
            f"{where}: class {values[0]} is not in data.yaml names (0-{len(names) - 1})"
            if len(coords) >= 4
            else f"{where}: {len(values)} values; a YOLO box is 'class cx cy w h', normalised 0-1"
        )
        raw.problems.append(problem)
        return
    if max(coords) > 1 + NORMALISED_TOLERANCE or min(coords) < -NORMALISED_TOLERANCE:
        raw.problems.append(
            f"{where}: coordinates {coords} are not normalised to 0-1 (YOLO's format); "
            "divide x and w by the image width, y and h by its height"
        )
        return
    if len(coords) <= 5:  # a box, with a confidence after it or not
        cx, cy, w, h = coords[:4]
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    else:  # a polygon (an odd count ends with a confidence)
        points = coords[: len(coords) // 2 * 2]
        xs, ys = points[0::2], points[1::2]
        box = [min(xs), min(ys), max(xs), max(ys)]
    raw.bboxes.append([box[0] * width, box[1] * height, box[2] * width, box[3] * height])
    raw.labels.append(names[int(number)])
