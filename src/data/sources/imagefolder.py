"""The Hugging Face `imagefolder` layout: DIR/train/metadata.jsonl (and DIR/test/, validation/ or val/), or
DIR/metadata.jsonl alone; one line per image, boxes in pixels. The box format of a line is never guessed
(src/data/dataset.py's docstring gives the rule).
"""

from __future__ import annotations

import json
from pathlib import Path

from src.data.records import TEST_SPLIT_NAMES, DatasetError, NoOwnSplit, RawRecord, holdout, xywh_to_xyxy

XYWH_NAMES, XYXY_NAMES = ("xywh", "coco"), ("xyxy", "pascal_voc")


def read_imagefolder(root: Path, split: str, source: str) -> list[RawRecord]:
    """train, validation or test: DIR/test/ is the test split (else DIR/validation/, val/ or valid/), and
    DIR/validation/ (or val/, valid/) the validation split where DIR/test/ is there too."""
    names = class_names_from_card(root)
    own = [name for name in TEST_SPLIT_NAMES if (root / name / "metadata.jsonl").is_file()]
    held = {
        "test": own[0] if own else None,
        "validation": own[1] if own[:1] == ["test"] and own[1:] else None,
    }
    if split == "validation" and held["validation"] is None:
        raise NoOwnSplit(f"{source}: no validation split of its own")
    if split != "train" and held[split] is not None:
        return _read_metadata(root / str(held[split]) / "metadata.jsonl", names)
    if split == "train" and own and (root / "train" / "metadata.jsonl").is_file():
        return _read_metadata(root / "train" / "metadata.jsonl", names)
    whole = root / "train" / "metadata.jsonl"
    whole = whole if whole.is_file() else root / "metadata.jsonl"
    if whole.is_file():
        return holdout(_read_metadata(whole, names), split, source)
    raise DatasetError(
        f"--dataset {root}: no {split}/metadata.jsonl; expected the imagefolder layout "
        "DIR/train/metadata.jsonl (+ images), a COCO, YOLO or VOC folder, or run `python -m src.fixtures` "
        "for a sample"
    )


def class_names_from_card(root: Path) -> list[str] | None:
    """ClassLabel names of the `category` feature declared in DIR/README.md (a dataset card's YAML)."""
    card = root / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    import yaml

    try:
        header = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return None
    return _category_names(header)


def _category_names(node, inside_category: bool = False) -> list[str] | None:
    """The `class_label.names` under a feature named category(ies), searched depth first."""
    if isinstance(node, list):
        return next((n for item in node if (n := _category_names(item, inside_category))), None)
    if not isinstance(node, dict):
        return None
    inside_category = inside_category or node.get("name") in ("category", "categories")
    label = node.get("class_label")
    if inside_category and isinstance(label, dict) and label.get("names"):
        names = label["names"]
        if isinstance(names, dict):
            return [str(names[key]) for key in sorted(names, key=lambda k: int(k))]
        return [str(name) for name in names]
    return next((n for value in node.values() if (n := _category_names(value, inside_category))), None)


def _read_metadata(metadata: Path, class_names: list[str] | None) -> list[RawRecord]:
    records = []
    for number, line in enumerate(metadata.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"{metadata}: line {number} is not JSON ({error.msg}); fix or remove it"
            ) from None
        objects = row.get("objects") or {}
        if not isinstance(objects, dict):
            objects = {"bbox": [], "label": []}
        bboxes, labels, problems = _imagefolder_boxes(row, objects, class_names)
        crowd = objects.get("iscrowd")
        image = metadata.parent / str(row.get("file_name", ""))
        where = f"{metadata.name} line {number} ({row.get('file_name')})"
        crowd_flags = [bool(c) for c in crowd] if isinstance(crowd, list) else None
        records.append(RawRecord(image, bboxes, labels, where, crowd_flags, problems))
    return records


def _imagefolder_boxes(row: dict, objects: dict, class_names: list[str] | None) -> tuple[list, list, list]:
    """(boxes as x1, y1, x2, y2; labels; problems) of one metadata line, by the module docstring's rule."""
    bboxes = objects.get("bbox") or []
    category = objects.get("category", objects.get("categories"))
    stated = objects.get("bbox_format", row.get("bbox_format"))
    if stated is not None and stated not in XYWH_NAMES + XYXY_NAMES:
        return bboxes, [], [f'objects.bbox_format = {stated!r}: use "xywh" (COCO) or "xyxy"']
    if stated is None and category is not None and "label" in objects:
        return (
            bboxes,
            [],
            [
                "objects has both category (Hugging Face's convention: bbox is [x, y, w, h]) and label "
                '(this project\'s: [x1, y1, x2, y2]); add "bbox_format": "xywh" or "xyxy" to objects'
            ],
        )
    if category is None and "label" not in objects and bboxes:
        return bboxes, [], ["objects has bbox but no category (or label) to name the boxes"]
    xywh = stated in XYWH_NAMES or (stated is None and category is not None)
    if xywh:
        bboxes = [xywh_to_xyxy(b) for b in bboxes]
    if category is None:
        return bboxes, objects.get("label") or [], []
    labels, problems = _category_labels(category, class_names)
    return bboxes, labels, problems


def _category_labels(category, class_names: list[str] | None) -> tuple[list, list[str]]:
    if not isinstance(category, list):
        return [], [f"objects.category = {category!r} is not a list"]
    labels, problems = [], []
    for j, value in enumerate(category):
        if isinstance(value, str):
            labels.append(value)
        elif isinstance(value, int) and not isinstance(value, bool) and class_names is None:
            labels.append("")
            problems.append(
                f"objects.category[{j}] = {value} is a class id, but no class names are declared: add them "
                "to DIR/README.md as a dataset card does (dataset_info: features: objects: category: "
                "class_label: names), or write the names as strings in category"
            )
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(class_names):
            labels.append(class_names[value])
        else:
            labels.append("")
            known = f"0-{len(class_names) - 1}" if class_names else "none"
            problems.append(f"objects.category[{j}] = {value!r} is not a class id of README.md ({known})")
    return labels, problems
