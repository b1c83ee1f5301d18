"""Detection records: as a source holds them (`RawRecord`), checked (`DetectionRecord`), and the splits a
source does not hold itself. Every source reader (src/data/sources/) makes RawRecords; `validate_record`
checks each one before any model loads, naming the record and the field.

Three splits: train, validation, test. A source's own held-out split is the test split (its `test`, else its
`validation`/`val`); a source with both uses them as they are. A source without a held-out split holds out
every 10th image as the test split (`holdout`). A validation split that the source does not hold is carved
from the train split (`carve_validation`): a share of it, spread evenly, the same every time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from src.data.boxes import Box

log = logging.getLogger(__name__)

HOLDOUT_EVERY = 10
EDGE_TOLERANCE_PX = 1.0  # annotation tools round; a box 1 px past the edge is not an error
SPLITS = ("train", "validation", "test")
VALIDATION_NAMES = ("validation", "val", "valid")  # a source's own validation split, first found
TEST_SPLIT_NAMES = ("test", *VALIDATION_NAMES)  # its own held-out (test) split, first found
MIN_VALIDATION_IMAGES = 4  # a carved validation split has at least this many, and leaves as many to train


class DatasetError(ValueError):
    """A data set that cannot be used as given; the message says what to fix."""


class NoOwnSplit(DatasetError):
    """The source holds no validation split of its own (it has no test and validation split both)."""


@dataclass
class DetectionRecord:
    """One image and its labelled pixel boxes; `where` names it in error messages.

    `crowd_boxes` are regions to ignore (COCO iscrowd, VOC difficult): never an answer, never a miss.
    """

    image: object  # a path, or a PIL image (hub data sets)
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    where: str = ""
    crowd_boxes: list[Box] = field(default_factory=list)


@dataclass
class RawRecord:
    """A record as read from the source, before validation: boxes as [x1, y1, x2, y2] in pixels."""

    image: object
    bboxes: list
    labels: list
    where: str
    crowd: list[bool] | None = None  # parallel to bboxes; None: no crowd region
    problems: list[str] = field(default_factory=list)  # what the reader already found wrong
    searched: tuple[Path, ...] = ()  # folders the image was looked for in (for "not found")


def holdout_indices(count: int) -> list[int]:
    """Which of `count` records a source without a test split holds out: every HOLDOUT_EVERY-th, and
    the last one when that gives none but there are two or more."""
    held = [i for i in range(count) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    return held or ([count - 1] if count >= 2 else [])


def too_few_images_message(source: str, count: int) -> str:
    return (
        f"dataset {source}: {count} image(s) and no test split, so nothing is left to evaluate on. "
        "Add images (with 2 or more, one is held out for testing), or give a test split "
        "(DIR/test/metadata.jsonl, instances_val*.json beside instances_train*.json, data.yaml's val, "
        "VOC's ImageSets/Main/val.txt)"
    )


HELD_OUT: set[str] = set()  # sources whose test split was held out of their one split


def holdout(records: list, split: str, source: str) -> list:
    """The `split` part of a source that has no test split of its own (see holdout_indices).

    Raises DatasetError for the test split of a one-image source: training on it would end in an
    evaluation with nothing to evaluate.
    """
    held = set(holdout_indices(len(records)))
    if records and source not in HELD_OUT:
        HELD_OUT.add(source)
        log.info(
            "dataset %s has no test split: %d of its %d images are held out for testing "
            "(every %dth, and at least one)",
            source,
            len(held),
            len(records),
            HOLDOUT_EVERY,
        )
    if split == "train":
        return [r for i, r in enumerate(records) if i not in held]
    if records and not held:
        raise DatasetError(too_few_images_message(source, len(records)))
    return [records[i] for i in sorted(held)]


def carve_validation(records: list, fraction: float, source: str) -> tuple[list, list]:
    """(train, validation) of a train split: `fraction` of its records, at least MIN_VALIDATION_IMAGES,
    spread evenly over it (the same records every time). DatasetError when too few would be left."""
    count = len(records)
    size = max(MIN_VALIDATION_IMAGES, round(count * fraction))
    if count - size < MIN_VALIDATION_IMAGES:
        raise DatasetError(
            f"dataset {source}: {count} training image(s) are too few to carve a validation split of "
            f"{size} (--val-fraction {fraction:g}, at least {MIN_VALIDATION_IMAGES}) and keep "
            f"{MIN_VALIDATION_IMAGES} to train on; add images, or give the data set a validation split of "
            "its own beside its test split (DIR/validation/ with DIR/test/, instances_val*.json with "
            "instances_test*.json, data.yaml's val with test, VOC's val.txt with test.txt)"
        )
    picked = {int((k + 0.5) * count / size) for k in range(size)}
    return [r for i, r in enumerate(records) if i not in picked], [records[i] for i in sorted(picked)]


def xywh_to_xyxy(bbox) -> list:
    if (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        x, y, w, h = bbox
        return [x, y, x + w, y + h]
    return bbox  # left as is: validation reports it


def _image_size(image) -> tuple[int, int]:
    """(width, height), opening a path only far enough to check it is a readable image."""
    from PIL import Image

    if hasattr(image, "size"):
        return image.size
    with Image.open(image) as opened:
        opened.verify()
        return opened.size


def _box_problems(field_name: str, bbox, width: int, height: int) -> list[str]:
    if not (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        return [f"{field_name} = {bbox!r} is not four numbers [x1, y1, x2, y2]"]
    if not all(math.isfinite(v) for v in bbox):
        return [f"{field_name} = {list(bbox)} holds a NaN or infinite coordinate"]
    x1, y1, x2, y2 = bbox
    if x2 <= x1 or y2 <= y1:
        return [f"{field_name} = {list(bbox)} is inverted or empty (need x1 < x2 and y1 < y2)"]
    tol = EDGE_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        return [f"{field_name} = {list(bbox)} lies outside the {width}x{height} image"]
    return []


def _not_found(raw: RawRecord) -> str:
    if not raw.searched:
        return f"image {raw.image} not found"
    looked = ", ".join(str(d) for d in raw.searched)
    return (
        f"image {Path(str(raw.image)).name} not found (looked in {looked}); "
        "pass --image-root DIR, the folder that holds the images"
    )


def validate_record(raw: RawRecord, index: int) -> tuple[DetectionRecord | None, list[str]]:
    """The checked record, or None with the problems found (each names the record and the field)."""
    head = f"record {index} ({raw.where})"
    if isinstance(raw.image, Path) and not raw.image.is_file():
        return None, [f"{head}: {_not_found(raw)}"]
    try:
        width, height = _image_size(raw.image)
    except Exception as error:  # PIL raises many types for a bad file
        return None, [f"{head}: image {raw.image} is unreadable ({type(error).__name__})"]
    problems = list(raw.problems)
    if len(raw.bboxes) != len(raw.labels) and not problems:
        problems.append(f"objects: {len(raw.bboxes)} bbox but {len(raw.labels)} label entries")
    crowd = raw.crowd or [False] * len(raw.bboxes)
    boxes, crowd_boxes = [], []
    for j, (bbox, label) in enumerate(zip(raw.bboxes, raw.labels, strict=False)):
        found = _box_problems(f"objects.bbox[{j}]", bbox, width, height)
        if not isinstance(label, str) or not label.strip():
            found.append(f"objects.label[{j}] = {label!r} is empty")
        problems.extend(found)
        if not found:
            x1, y1, x2, y2 = (float(v) for v in bbox)
            box = Box(label.strip(), max(0.0, x1), max(0.0, y1), min(x2, width), min(y2, height))
            (crowd_boxes if j < len(crowd) and crowd[j] else boxes).append(box)
    record = DetectionRecord(raw.image, width, height, boxes, raw.where, crowd_boxes)
    return record, list(dict.fromkeys(f"{head}: {p}" for p in problems))
