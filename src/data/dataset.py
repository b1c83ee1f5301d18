"""Detection data: load records, check every one up front, turn them into conversations.

Sources (``--dataset``):
  * a folder in the Hugging Face ``imagefolder`` layout: ``DIR/train/metadata.jsonl`` (and
    ``DIR/test/...``), one line per image ``{"file_name", "objects": {"bbox": [[x1,y1,x2,y2], ...],
    "label": [...]}}``, boxes in pixels (``src.data.synthetic`` writes this);
  * a COCO-style JSON file (``images``, ``annotations`` with ``bbox`` [x, y, w, h], ``categories``),
    images found relative to the file or in ``images/`` beside it;
  * a hub dataset name (needs a network): the ``datasets`` object-detection convention, ``image`` plus
    ``objects`` with ``bbox`` [x, y, w, h] and ``category`` (ClassLabel).
A source without a test split gives every 10th record to the test split.

Every record is validated before any model loads; problems name the record and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from src.data.boxes import Box, format_answer, smart_resize

DEFAULT_PROMPT = "Detect every object in the image and give its label and bounding box."
HOLDOUT_EVERY = 10
EDGE_TOLERANCE_PX = 1.0  # annotation tools round; a box 1 px past the edge is not an error
MAX_LISTED_PROBLEMS = 10


class DatasetError(ValueError):
    """A data set that cannot be used as given; the message says what to fix."""


@dataclass
class DetectionRecord:
    """One image and its labelled pixel boxes; `where` names it in error messages."""

    image: object  # a path, or a PIL image (hub data sets)
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    where: str = ""


@dataclass
class RawRecord:
    """A record as read from the source, before validation."""

    image: object
    bboxes: list
    labels: list
    where: str


def load_records(
    source: str, split: str = "train", skip_bad: bool = False
) -> tuple[list[DetectionRecord], int]:
    """Validated records of one split, and how many bad ones were skipped.

    Raises DatasetError listing the bad records unless `skip_bad`; an empty result is an error too.
    """
    raw = read_raw_records(source, split)
    records, problems = [], []
    for index, item in enumerate(raw):
        record, record_problems = validate_record(item, index)
        problems.extend(record_problems)
        if record is not None and not record_problems:
            records.append(record)
    bad = len(raw) - len(records)
    if problems and not skip_bad:
        raise DatasetError(_problem_message(source, split, bad, problems))
    if not records:
        raise DatasetError(f"dataset {source} ({split}): no usable records; check the path and the split")
    return records, bad


def _problem_message(source: str, split: str, bad: int, problems: list[str]) -> str:
    listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS])
    more = (
        f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more"
        if len(problems) > MAX_LISTED_PROBLEMS
        else ""
    )
    return (
        f"dataset {source} ({split}): {bad} bad record(s):\n{listed}{more}\n"
        "Fix these records, or pass --skip-bad-records to train without them."
    )


def read_raw_records(source: str, split: str) -> list[RawRecord]:
    path = Path(source)
    if path.is_dir():
        return _read_imagefolder(path, split)
    if path.suffix == ".json":
        if not path.is_file():
            raise DatasetError(f"--dataset {source}: file not found")
        return _read_coco(path, split)
    if path.exists() or source.startswith((".", "/")) or source.endswith(".jsonl"):
        raise DatasetError(f"--dataset {source}: not an imagefolder directory or a COCO .json file")
    return _read_hub(source, split)


def _holdout(records: list, split: str) -> list:
    """Every HOLDOUT_EVERY-th record is test; the rest train."""
    is_test = split != "train"
    return [r for i, r in enumerate(records) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == is_test]


def _read_imagefolder(root: Path, split: str) -> list[RawRecord]:
    split_dir = root / split
    if (split_dir / "metadata.jsonl").is_file():
        return _read_metadata(split_dir / "metadata.jsonl")
    if (root / "metadata.jsonl").is_file() and not (root / "train").is_dir():
        return _holdout(_read_metadata(root / "metadata.jsonl"), split)
    raise DatasetError(
        f"--dataset {root}: no {split}/metadata.jsonl; expected the imagefolder layout "
        "DIR/train/metadata.jsonl (+ images), or run `python -m src.fixtures` for a sample"
    )


def _read_metadata(metadata: Path) -> list[RawRecord]:
    records = []
    for number, line in enumerate(metadata.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata.name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"{metadata}: line {number} is not JSON ({error.msg}); fix or remove it"
            ) from None
        objects = row.get("objects") or {}
        image = metadata.parent / str(row.get("file_name", ""))
        records.append(
            RawRecord(
                image, objects.get("bbox", []), objects.get("label", []), f"{where} ({row.get('file_name')})"
            )
        )
    return records


def _xywh_to_xyxy(bbox) -> list:
    if isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox):
        x, y, w, h = bbox
        return [x, y, x + w, y + h]
    return bbox  # left as is: validation reports it


def _read_coco(path: Path, split: str) -> list[RawRecord]:
    coco = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    by_image: dict = {img["id"]: ([], []) for img in coco.get("images", [])}
    for ann in coco.get("annotations", []):
        boxes, labels = by_image.setdefault(ann.get("image_id"), ([], []))
        boxes.append(_xywh_to_xyxy(ann.get("bbox")))
        labels.append(names.get(ann.get("category_id"), ""))
    records = []
    for img in coco.get("images", []):
        image = path.parent / img["file_name"]
        if not image.exists() and (path.parent / "images" / img["file_name"]).exists():
            image = path.parent / "images" / img["file_name"]
        boxes, labels = by_image[img["id"]]
        records.append(
            RawRecord(image, boxes, labels, f"{path.name} image id {img['id']} ({img['file_name']})")
        )
    return _holdout(records, split)


def _read_hub(name: str, split: str) -> list[RawRecord]:
    import datasets

    try:
        available = datasets.get_dataset_split_names(name)
    except Exception as error:  # offline, unknown name, gated: all mean "cannot use it"
        raise DatasetError(
            f"--dataset {name}: not a local folder or .json file, and the hub dataset "
            f"could not be reached ({type(error).__name__}); pass a local path"
        ) from None
    wanted = split if split in available else "train"
    rows = datasets.load_dataset(name, split=wanted)
    category = (
        rows.features["objects"].feature["category"]
        if hasattr(rows.features["objects"], "feature")
        else rows.features["objects"]["category"].feature
    )
    records = []
    for index, row in enumerate(rows):
        objects = row["objects"]
        labels = [category.int2str(c) for c in objects["category"]]
        records.append(
            RawRecord(
                row["image"],
                [_xywh_to_xyxy(b) for b in objects["bbox"]],
                labels,
                f"{name}[{wanted}] row {index}",
            )
        )
    return records if wanted == split else _holdout(records, split)


def _image_size(image) -> tuple[int, int]:
    """(width, height), opening a path only far enough to check it is a readable image."""
    from PIL import Image

    if hasattr(image, "size"):
        return image.size
    with Image.open(image) as opened:
        opened.verify()
        return opened.size


def _box_problems(index: int, bbox, width: int, height: int) -> list[str]:
    if not (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        return [f"objects.bbox[{index}] = {bbox!r} is not four numbers [x1, y1, x2, y2]"]
    x1, y1, x2, y2 = bbox
    if x2 <= x1 or y2 <= y1:
        return [f"objects.bbox[{index}] = {list(bbox)} is inverted or empty (need x1 < x2 and y1 < y2)"]
    tol = EDGE_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        return [f"objects.bbox[{index}] = {list(bbox)} lies outside the {width}x{height} image"]
    return []


def validate_record(raw: RawRecord, index: int) -> tuple[DetectionRecord | None, list[str]]:
    """The checked record, or None with the problems found (each names the record and the field)."""
    head = f"record {index} ({raw.where})"
    if isinstance(raw.image, Path) and not raw.image.is_file():
        return None, [f"{head}: image {raw.image} not found"]
    try:
        width, height = _image_size(raw.image)
    except Exception as error:  # PIL raises many types for a bad file
        return None, [f"{head}: image {raw.image} is unreadable ({type(error).__name__})"]
    problems = []
    if len(raw.bboxes) != len(raw.labels):
        problems.append(f"objects: {len(raw.bboxes)} bbox but {len(raw.labels)} label entries")
    boxes = []
    for j, (bbox, label) in enumerate(zip(raw.bboxes, raw.labels, strict=False)):
        found = _box_problems(j, bbox, width, height)
        if not isinstance(label, str) or not label.strip():
            found.append(f"objects.label[{j}] = {label!r} is empty")
        problems.extend(found)
        if not found:
            x1, y1, x2, y2 = (float(v) for v in bbox)
            boxes.append(Box(label.strip(), max(0.0, x1), max(0.0, y1), min(x2, width), min(y2, height)))
    record = DetectionRecord(raw.image, width, height, boxes, raw.where)
    return record, [f"{head}: {p}" for p in problems]


def _has_image(sample: dict) -> bool:
    """True when a conversation sample carries at least one image (the plan's helper)."""
    return bool(sample.get("images")) and any(
        part.get("type") == "image"
        for message in sample.get("messages", [])
        for part in (message["content"] if isinstance(message["content"], list) else [])
    )


def convert_to_conversation_format(
    record: DetectionRecord,
    family: str = "qwen2_vl",
    prompt: str = DEFAULT_PROMPT,
    pixel_limits: tuple[int, int] | None = None,
) -> dict:
    """A detection record as a user/assistant conversation with the answer in the family's format.

    `pixel_limits` (min, max pixels of the processor) matter for qwen2_5_vl, whose answer is in
    pixels of the image as the processor resizes it.
    """
    resized = None
    if family == "qwen2_5_vl":
        low, high = pixel_limits or (56 * 56, 28 * 28 * 1280)
        resized = smart_resize(record.height, record.width, min_pixels=low, max_pixels=high)
    answer = format_answer(record.boxes, record.width, record.height, family, resized)
    image = str(record.image) if isinstance(record.image, Path) else record.image
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image],
    }


def processor_pixel_limits(processor) -> tuple[int, int]:
    size = processor.image_processor.size
    return size["shortest_edge"], size["longest_edge"]


def build_dataset(source: str, split: str, family: str, processor, skip_bad: bool = False):
    """A `datasets.Dataset` of conversations, plus the number of skipped bad records."""
    import datasets

    records, skipped = load_records(source, split, skip_bad)
    limits = processor_pixel_limits(processor)
    rows = [convert_to_conversation_format(r, family, pixel_limits=limits) for r in records]
    return datasets.Dataset.from_list(rows), skipped
