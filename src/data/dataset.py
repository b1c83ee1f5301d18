"""Detection data: load records, check every one up front, turn them into conversations.

Sources (``--dataset``; ``image_root`` is ``--image-root DIR``, another folder to find images in):
  * a COCO instances file (``images``, ``annotations`` with ``bbox`` [x, y, w, h] in pixels, float or int,
    ``categories`` with any ids). Images are looked for in ``image_root``, next to the file, in
    ``images/`` beside it, and in COCO's own layout: ``annotations/instances_val2017.json`` with the
    images in ``val2017/`` (or ``images/val2017/``) beside ``annotations/``;
  * a folder holding COCO instances files (in it or in its ``annotations/``): ``instances_train*.json``
    is the train split and ``instances_val*.json`` the test split; one file alone is split as below;
  * a YOLO folder (``data.yaml``, ``images/``, ``labels/*.txt``) or a Pascal VOC folder
    (``Annotations/*.xml``, ``JPEGImages/``): see ``src.data.formats``;
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
    (``src.data.synthetic`` writes it);
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

import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from src.data.boxes import Box, format_answer, smart_resize

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Detect every object in the image and give its label and bounding box."
HOLDOUT_EVERY = 10
EDGE_TOLERANCE_PX = 1.0  # annotation tools round; a box 1 px past the edge is not an error
MAX_LISTED_PROBLEMS = 10
TEST_SPLIT_NAMES = ("test", "validation", "val", "valid")  # a source's own held-out split, first found
XYWH_NAMES, XYXY_NAMES = ("xywh", "coco"), ("xyxy", "pascal_voc")
# Answer budget: the longest answer's tokens, plus a share and a few tokens for a model that answers a
# little more than the truth (an extra box, a longer label), plus the closing end-of-turn token.
ANSWER_MARGIN_SHARE = 0.25
ANSWER_MARGIN_TOKENS = 16
MIN_ANSWER_BUDGET = 32
_WORST_COORDINATE = 9999  # four digits: no 0-1000 coordinate, nor any resized pixel, writes longer


class DatasetError(ValueError):
    """A data set that cannot be used as given; the message says what to fix."""


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


def load_records(
    source: str, split: str = "train", skip_bad: bool = False, image_root: str | Path | None = None
) -> tuple[list[DetectionRecord], int]:
    """Validated records of one split, and how many bad ones were skipped.

    Raises DatasetError listing the bad records unless `skip_bad`; an empty result is an error too.
    """
    raw = read_raw_records(source, split, image_root)
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


def read_raw_records(source: str, split: str, image_root: str | Path | None = None) -> list[RawRecord]:
    """The split's records as the source holds them (see the module docstring for the sources)."""
    from src.data import formats

    path = Path(source)
    root = Path(image_root) if image_root else None
    if root is not None and not root.is_dir():
        raise DatasetError(f"--image-root {image_root}: not a directory; pass the folder holding the images")
    if path.is_dir():
        if coco := coco_annotation_files(path):
            return _read_coco_folder(coco, split, source, root)
        if formats.is_yolo(path):
            return formats.read_yolo(path, split, source)
        if formats.is_voc(path):
            return formats.read_voc(path, split, source)
        return _read_imagefolder(path, split, source)
    if path.suffix == ".json":
        if not path.is_file():
            raise DatasetError(f"--dataset {source}: file not found")
        return holdout(_read_coco(path, root), split, source)
    if path.exists() or source.startswith((".", "/")) or source.endswith(".jsonl"):
        raise DatasetError(
            f"--dataset {source}: not a data set folder (imagefolder, COCO, YOLO or VOC) or a COCO .json file"
        )
    return _read_hub(source, split)


# ---------------------------------------------------------------- splits


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


_HOLDOUT_NOTED: set[str] = set()


def holdout(records: list, split: str, source: str) -> list:
    """The `split` part of a source that has no test split of its own (see holdout_indices).

    Raises DatasetError for the test split of a one-image source: training on it would end in an
    evaluation with nothing to evaluate.
    """
    held = set(holdout_indices(len(records)))
    if records and source not in _HOLDOUT_NOTED:
        _HOLDOUT_NOTED.add(source)
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


# ---------------------------------------------------------------- imagefolder (metadata.jsonl)


def _read_imagefolder(root: Path, split: str, source: str) -> list[RawRecord]:
    names = class_names_from_card(root)
    own_test = next((root / n for n in TEST_SPLIT_NAMES if (root / n / "metadata.jsonl").is_file()), None)
    exact = root / split / "metadata.jsonl"
    if exact.is_file() and (split != "train" or own_test is not None):
        return _read_metadata(exact, names)
    if split != "train" and own_test is not None:
        return _read_metadata(own_test / "metadata.jsonl", names)
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
        bboxes = [_xywh_to_xyxy(b) for b in bboxes]
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


def _xywh_to_xyxy(bbox) -> list:
    if (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        x, y, w, h = bbox
        return [x, y, x + w, y + h]
    return bbox  # left as is: validation reports it


# ---------------------------------------------------------------- COCO


def coco_annotation_files(directory: Path) -> dict[str, Path]:
    """{"train"|"val"|"test": instances file} in `directory` or its annotations/ folder; {} if none."""
    found = sorted(directory.glob("instances_*.json")) + sorted(
        directory.glob("annotations/instances_*.json")
    )
    roles: dict[str, list[Path]] = {}
    for path in found:
        name = path.stem.removeprefix("instances_").lower()
        role = "train" if "train" in name else "val" if "val" in name else "test" if "test" in name else None
        if role:
            roles.setdefault(role, []).append(path)
    if clash := {role: paths for role, paths in roles.items() if len(paths) > 1}:
        role, paths = next(iter(clash.items()))
        listed = ", ".join(p.name for p in paths)
        raise DatasetError(
            f"--dataset {directory}: {len(paths)} {role} annotation files ({listed}); "
            "pass one of them as --dataset FILE.json"
        )
    return {role: paths[0] for role, paths in roles.items()}


def _read_coco_folder(
    files: dict[str, Path], split: str, source: str, image_root: Path | None
) -> list[RawRecord]:
    """A train file and a val (or test) file are the two splits; one file alone is held out from."""
    own_test = files.get("val") or files.get("test")
    if "train" in files and own_test is not None:
        return _read_coco(files["train"] if split == "train" else own_test, image_root)
    only = next(files[role] for role in ("train", "val", "test") if role in files)
    return holdout(_read_coco(only, image_root), split, source)


@functools.lru_cache(maxsize=4)
def _coco_json(path: str, modified_ns: int) -> dict:
    """The parsed file, kept: a worker reads train2017's 450 MB once for its checks and its data."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}); fix the file"
        ) from None


def coco_image_dirs(path: Path, image_root: Path | None = None) -> list[Path]:
    """Where a COCO file's images may be, in the order they are looked for."""
    split_name = path.stem.rsplit("_", 1)[-1]  # instances_val2017 -> val2017
    dirs = [
        image_root,
        path.parent,
        path.parent / "images",
        path.parent / split_name,
        path.parent.parent / split_name,
        path.parent.parent / "images" / split_name,
    ]
    return list(dict.fromkeys(d for d in dirs if d is not None))


def _find_image(file_name: str, dirs: list[Path], last_hit: list[int]) -> Path | None:
    """The first existing dirs[i] / file_name, trying the folder that held the previous image first."""
    order = [last_hit[0], *(i for i in range(len(dirs)) if i != last_hit[0])]
    for i in order:
        for candidate in (dirs[i] / file_name, dirs[i] / Path(file_name).name):
            if candidate.is_file():
                last_hit[0] = i
                return candidate
    return None


def _read_coco(path: Path, image_root: Path | None = None) -> list[RawRecord]:
    coco = _coco_json(str(path), path.stat().st_mtime_ns)
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DatasetError(f"{path}: not a COCO instances file (no 'images' list)")
    names = {c.get("id"): c.get("name") for c in coco.get("categories", []) if isinstance(c, dict)}
    by_image: dict = {img.get("id"): RawRecord(None, [], [], "", []) for img in coco["images"]}
    for ann in coco.get("annotations", []):
        raw = by_image.get(ann.get("image_id"))
        if raw is None:
            continue  # an annotation of an image the file does not list: pycocotools ignores it too
        raw.bboxes.append(_xywh_to_xyxy(ann.get("bbox")))
        raw.labels.append(names.get(ann.get("category_id"), ""))
        raw.crowd.append(bool(ann.get("iscrowd", 0)))
        if ann.get("category_id") not in names:
            raw.problems.append(
                f"annotation {ann.get('id')}: category_id {ann.get('category_id')!r} is not in categories"
            )
    dirs, last_hit = coco_image_dirs(path, image_root), [0]
    records = []
    for img in coco["images"]:
        raw = by_image[img.get("id")]
        file_name = str(img.get("file_name", ""))
        raw.image = _find_image(file_name, dirs, last_hit) or path.parent / file_name
        raw.searched = tuple(dirs)
        raw.where = f"{path.name} image id {img.get('id')} ({file_name})"
        records.append(raw)
    return records


# ---------------------------------------------------------------- hub


def _read_hub(name: str, split: str) -> list[RawRecord]:
    import datasets

    try:
        available = datasets.get_dataset_split_names(name)
    except Exception as error:  # offline, unknown name, gated: all mean "cannot use it"
        raise DatasetError(
            f"--dataset {name}: not a local folder or .json file, and the hub dataset "
            f"could not be reached ({type(error).__name__}); pass a local path"
        ) from None
    own_test = next((s for s in (split, *TEST_SPLIT_NAMES) if s != "train" and s in available), None)
    wanted = "train" if split == "train" or own_test is None else own_test
    rows = datasets.load_dataset(name, split=wanted)
    objects_feature = rows.features["objects"]
    category = (
        objects_feature.feature["category"]
        if hasattr(objects_feature, "feature")
        else objects_feature["category"].feature
    )
    records = []
    for index, row in enumerate(rows):
        objects = row["objects"]
        labels = [
            category.int2str(c) if hasattr(category, "int2str") else str(c) for c in objects["category"]
        ]
        crowd = objects.get("iscrowd")
        records.append(
            RawRecord(
                row["image"],
                [_xywh_to_xyxy(b) for b in objects["bbox"]],
                labels,
                f"{name}[{wanted}] row {index}",
                [bool(c) for c in crowd] if crowd is not None else None,
            )
        )
    return records if own_test is not None else holdout(records, split, name)


# ---------------------------------------------------------------- validation


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
    for qwen2_5_vl, whose answer is in pixels of the image as the processor resizes it.
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


def answer_labels(source: str, split: str, image_root: str | Path | None = None) -> list[list[str]]:
    """The answer labels (crowd regions left out) of every image of a split, read without opening images."""
    labels = []
    for raw in read_raw_records(source, split, image_root):
        crowd = raw.crowd or [False] * len(raw.labels)
        labels.append([str(label) for j, label in enumerate(raw.labels) if not (j < len(crowd) and crowd[j])])
    return labels


def _worst_case_answer(labels: list[str], family: str) -> str:
    """The answer for boxes with these labels, every coordinate written at its longest (four digits)."""
    if family == "qwen2_5_vl":
        side = _WORST_COORDINATE
        boxes = [Box(label, side, side, side, side) for label in labels]
        return format_answer(boxes, side, side, family, resized=(side, side))
    return format_answer([Box(label, 1, 1, 1, 1) for label in labels], 1, 1, family)  # all 1000


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


def processor_pixel_limits(processor) -> tuple[int, int]:
    size = processor.image_processor.size
    return size["shortest_edge"], size["longest_edge"]


def build_dataset(
    source: str,
    split: str,
    family: str,
    processor,
    skip_bad: bool = False,
    image_root: str | Path | None = None,
):
    """A `datasets.Dataset` of conversations, plus the number of skipped bad records."""
    import datasets

    records, skipped = load_records(source, split, skip_bad, image_root)
    limits = processor_pixel_limits(processor)
    rows = [convert_to_conversation_format(r, family, pixel_limits=limits) for r in records]
    return datasets.Dataset.from_list(rows), skipped
