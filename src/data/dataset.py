"""Detection data: load records, check every one up front, turn them into conversations.

Sources (``--dataset``; ``image_root`` is ``--image-root DIR``, another folder to find images in):
  * a COCO instances file (``images``, ``annotations`` with ``bbox`` [x, y, w, h] in pixels, float or int,
    ``categories`` with any ids). Images are looked for in ``image_root``, next to the file, in
    ``images/`` beside it, and in COCO's own layout: ``annotations/instances_val2017.json`` with the
    images in ``val2017/`` (or ``images/val2017/``) beside ``annotations/``;
  * a folder holding COCO instances files (in it or in its ``annotations/``): ``instances_train*.json``
    is the train split and ``instances_val*.json`` the test split; one file alone is split as below;
  * a YOLO folder (``data.yaml``, ``images/``, ``labels/*.txt``) or a Pascal VOC folder
    (``Annotations/*.xml``, ``JPEGImages/``): see ``src/data/sources/``;
  * a folder in the Hugging Face ``imagefolder`` layout, ``DIR/train/metadata.jsonl`` (and ``DIR/test/``,
    ``validation/`` or ``val/``), or ``DIR/metadata.jsonl`` alone; one line per image, boxes in pixels;
  * a hub dataset name (needs a network): the ``datasets`` object-detection convention, ``image`` plus
    ``objects`` with ``bbox`` [x, y, w, h] and ``category`` (ClassLabel).

Box format of an imagefolder line, never guessed:
  * ``objects.bbox_format`` (or ``bbox_format`` on the line) states it: ``"xywh"`` (also ``"coco"``) or
    ``"xyxy"`` (also ``"pascal_voc"``); it always wins;
  * otherwise ``objects.category`` means Hugging Face's convention (the datasets object-detection guide,
    AutoTrain): COCO [x, y, w, h], and ``category`` holds class ids (named by the ClassLabel ``names``
    in ``DIR/README.md``'s ``dataset_info``, as the hub's dataset cards declare them) or label strings;
  * otherwise ``objects.label`` (strings) means this project's own format: [x1, y1, x2, y2]
    (``src.fixtures.synthetic`` writes it);
  * a line with both ``category`` and ``label`` and no ``bbox_format`` is refused: the two conventions
    disagree on what the four numbers mean.

Crowd regions (COCO ``iscrowd: 1``, an imagefolder's ``objects.iscrowd``, VOC ``difficult``) are no
answers to learn: they are kept apart in ``DetectionRecord.crowd_boxes``, left out of the conversations,
and evaluation ignores predictions on them as pycocotools does.

A source without a test split holds out every 10th image for the test split, and at least one when
it has two or more (a log line says so); with one image there is nothing to test on, and
``load_records(..., "test")`` refuses with the fix. Every record is validated before any model loads;
problems name the record and the field.
"""

from __future__ import annotations

import math
from pathlib import Path

from src.data.boxes import Box, format_answer
from src.data.records import (
    HELD_OUT,
    SPLITS,
    DatasetError,
    DetectionRecord,
    NoOwnSplit,
    RawRecord,
    carve_validation,
    holdout,
    validate_record,
)
from src.data.sources import coco, hub, imagefolder, voc, yolo
from src.planning.pixels import limits_of_processor, smart_resize

DEFAULT_PROMPT = "Detect every object in the image and give its label and bounding box."
MAX_LISTED_PROBLEMS = 10
# Answer budget: the longest answer's tokens, plus a share and a few tokens for a model that answers a
# little more than the truth (an extra box, a longer label), plus the closing end-of-turn token.
ANSWER_MARGIN_SHARE = 0.25
ANSWER_MARGIN_TOKENS = 16
MIN_ANSWER_BUDGET = 32
_WORST_COORDINATE = 9999  # four digits: no 0-1000 coordinate, nor any resized pixel, writes longer


def load_records(
    source: str,
    split: str = "train",
    skip_bad: bool = False,
    image_root: str | Path | None = None,
    val_fraction: float = 0.0,
) -> tuple[list[DetectionRecord], int]:
    """Validated records of one split (train, validation or test), and how many bad ones were skipped.

    Raises DatasetError listing the bad records unless `skip_bad`; an empty result is an error too.
    `val_fraction` above 0 puts a validation split in use (see read_raw_records).
    """
    raw = read_raw_records(source, split, image_root, val_fraction)
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


def read_raw_records(
    source: str, split: str, image_root: str | Path | None = None, val_fraction: float = 0.0
) -> list[RawRecord]:
    """The split's records as the source holds them (see the module docstring for the sources).

    With `val_fraction` 0 (a plain launch) there are two splits, train and test, as the source gives them.
    Above 0 (a learning-rate search) a validation split is in use: the source's own where it has one beside
    its test split, else that share of the train split, which then trains without it. The test split is
    the same either way.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: one of {', '.join(SPLITS)}")
    if split == "test":
        return _read_source(source, "test", image_root, val_fraction > 0)
    if val_fraction <= 0:
        if split == "validation":
            raise DatasetError(f"dataset {source}: no validation split without --val-fraction")
        return _read_source(source, "train", image_root)
    try:
        own = _read_source(source, "validation", image_root, True)
    except NoOwnSplit:
        train, validation = carve_validation(_read_source(source, "train", image_root), val_fraction, source)
        return validation if split == "validation" else train
    return own if split == "validation" else _read_source(source, "train", image_root, True)


def split_sizes(source: str, image_root: str | Path | None = None, val_fraction: float = 0.0) -> dict:
    """Each split's images and how it was made, for summary.json and the report (reads no image)."""
    test = read_raw_records(source, "test", image_root, val_fraction)
    made = {
        "test": "held out of the source's one split: every 10th image"
        if source in HELD_OUT
        else "the source's own held-out split"
    }
    splits = {"test": {"images": len(test), "how": made["test"]}}
    train = read_raw_records(source, "train", image_root, val_fraction)
    splits["train"] = {"images": len(train), "how": "the source's train split"}
    if val_fraction > 0:
        validation = read_raw_records(source, "validation", image_root, val_fraction)
        try:
            _read_source(source, "validation", image_root, True)
            how = "the source's own validation split"
        except NoOwnSplit:
            how = f"carved from the train split: {val_fraction:.0%}, spread evenly, the same every time"
            splits["train"]["how"] += ", less the validation split"
        splits["validation"] = {"images": len(validation), "how": how}
    return splits


def _read_source(
    source: str, split: str, image_root: str | Path | None = None, with_validation: bool = False
) -> list[RawRecord]:
    """The split as the source's reader gives it; NoOwnSplit for a validation split it does not hold."""
    path = Path(source)
    root = Path(image_root) if image_root else None
    if root is not None and not root.is_dir():
        raise DatasetError(f"--image-root {image_root}: not a directory; pass the folder holding the images")
    if path.is_dir():
        if files := coco.coco_annotation_files(path):
            return coco.read_coco_folder(files, split, source, root)
        if yolo.is_yolo(path):
            return yolo.read_yolo(path, split, source)
        if voc.is_voc(path):
            return voc.read_voc(path, split, source, with_validation)
        return imagefolder.read_imagefolder(path, split, source)
    if path.suffix == ".json":
        if not path.is_file():
            raise DatasetError(f"--dataset {source}: file not found")
        if split == "validation":
            raise NoOwnSplit(f"{source}: no validation split of its own")
        return holdout(coco.read_coco(path, root), split, source)
    if path.exists() or source.startswith((".", "/")) or source.endswith(".jsonl"):
        raise DatasetError(
            f"--dataset {source}: not a data set folder (imagefolder, COCO, YOLO or VOC) or a COCO .json file"
        )
    return hub.read_hub(source, split)


# ---------------------------------------------------------------- splits


# ---------------------------------------------------------------- imagefolder (metadata.jsonl)


# ---------------------------------------------------------------- COCO


# ---------------------------------------------------------------- hub


# ---------------------------------------------------------------- validation


# ---------------------------------------------------------------- conversations and answer length


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

    Crowd regions are not part of the answer. `pixel_limits` (min, max pixels of the processor) matter
    for qwen2_5_vl only, whose answer is in pixels of the image as the processor resizes it; the other
    families answer on a 0-1000 scale of the original image, which no resize changes.
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


def answer_labels(
    source: str, split: str, image_root: str | Path | None = None, val_fraction: float = 0.0
) -> list[list[str]]:
    """The answer labels (crowd regions left out) of every image of a split, read without opening images."""
    labels = []
    for raw in read_raw_records(source, split, image_root, val_fraction):
        crowd = raw.crowd or [False] * len(raw.labels)
        labels.append([str(label) for j, label in enumerate(raw.labels) if not (j < len(crowd) and crowd[j])])
    return labels


def _worst_case_answer(labels: list[str], family: str) -> str:
    """The answer for boxes with these labels, every coordinate written at its longest (four digits)."""
    if family == "qwen2_5_vl":
        side = _WORST_COORDINATE
        boxes = [Box(label, side, side, side, side) for label in labels]
        return format_answer(boxes, side, side, family, resized=(side, side))
    # The 0-1000 families (qwen2_vl, qwen3_vl, qwen3_5): a box at the far corner of a 1x1 image is 1000 each.
    return format_answer([Box(label, 1, 1, 1, 1) for label in labels], 1, 1, family)


def longest_answer_tokens(label_lists: list[list[str]], tokenizer, family: str = "qwen2_vl") -> int:
    """Tokens of the longest answer among images with these labels, every coordinate at its longest.

    An upper bound of what the model is taught to write (real coordinates are never longer), which
    needs no image sizes; the closing end-of-turn token is not counted. Objects are tokenized one label
    at a time and summed per image (exact for qwen2_vl, whose objects are fenced by special tokens);
    the few longest images are then tokenized whole.
    """

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    per_label = {label: count(_worst_case_answer([label], family)) for ls in label_lists for label in ls}
    estimates = sorted(label_lists, key=lambda ls: sum(per_label[label] for label in ls), reverse=True)
    return max((count(_worst_case_answer(labels, family)) for labels in estimates[:5]), default=0)


def answer_budget(longest_answer: int) -> int:
    """max_new_tokens for answers up to `longest_answer` tokens: that, a margin, and the end token."""
    sized = math.ceil(longest_answer * (1 + ANSWER_MARGIN_SHARE)) + ANSWER_MARGIN_TOKENS + 1
    return max(MIN_ANSWER_BUDGET, sized)


def build_dataset(
    source: str,
    split: str,
    family: str,
    processor,
    skip_bad: bool = False,
    image_root: str | Path | None = None,
    val_fraction: float = 0.0,
):
    """A `datasets.Dataset` of conversations, plus the number of skipped bad records."""
    import datasets

    records, skipped = load_records(source, split, skip_bad, image_root, val_fraction)
    limits = limits_of_processor(processor)
    rows = [convert_to_conversation_format(r, family, pixel_limits=limits) for r in records]
    return datasets.Dataset.from_list(rows), skipped
