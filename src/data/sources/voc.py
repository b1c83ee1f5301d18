"""Pascal VOC folders; `src.data.dataset` calls this reader for `--dataset DIR`.

``DIR/Annotations/*.xml`` (or ``annotations/``), images in ``DIR/JPEGImages/`` (or ``images/``,
or beside the xml), each named by the xml's ``<filename>``. Splits from ``DIR/ImageSets/Main/``:
``trainval.txt`` and ``test.txt`` (VOC2007), else ``train.txt`` and ``val.txt`` (VOC2012); without them
every xml is read and images are held out. ``<bndbox>`` holds VOC's 1-based inclusive pixel indices, so
``xmin`` and ``ymin`` move down by one and ``xmax``, ``ymax`` stay (as the VOC devkit, detectron2 and
supervision read them). ``<difficult>1</difficult>`` objects are treated like COCO crowd regions: not
trained on, ignored by evaluation (as VOC's own evaluation ignores them).

Why this reader and not the `supervision` library's: src/data/sources/yolo.py says.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

from src.data.records import NoOwnSplit, RawRecord, holdout


def voc_folders(root: Path) -> tuple[Path, list[Path]] | None:
    """(annotations folder, folders images may be in), or None when `root` is no VOC folder."""
    for name in ("Annotations", "annotations"):
        annotations = root / name
        if annotations.is_dir() and next(annotations.glob("*.xml"), None) is not None:
            return annotations, [root / "JPEGImages", root / "images", annotations]
    return None


def is_voc(root: Path) -> bool:
    return voc_folders(root) is not None


def read_voc(root: Path, split: str, source: str, with_validation: bool = False) -> list[RawRecord]:
    """The split's records of a Pascal VOC folder (see the module docstring). `with_validation`: a
    validation split is in use, so VOC2007's train.txt trains (val.txt is the validation split), not
    its trainval.txt."""
    annotations, image_dirs = voc_folders(root)
    sets = root / "ImageSets" / "Main"

    def ids(name: str) -> list[str] | None:
        listing = sets / f"{name}.txt"
        return (
            [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
            if listing.is_file()
            else None
        )

    own = {"test": ids("test") or ids("val"), "validation": ids("val") if ids("test") else None}
    if ids("test") and ids("val") and ids("train") and with_validation:
        own["train"] = ids("train")
    else:
        own["train"] = ids("trainval") if ids("test") else ids("train")
    if split == "validation" and not (own["train"] and own["validation"]):
        raise NoOwnSplit(f"{source}: no validation split of its own")
    if own["train"] and own["test"]:
        return [_voc_record(annotations / f"{i}.xml", image_dirs) for i in own[split] or []]
    every = sorted(annotations.glob("*.xml"))
    return holdout([_voc_record(path, image_dirs) for path in every], split, source)


def _voc_record(xml_path: Path, image_dirs: list[Path]) -> RawRecord:
    raw = RawRecord(image_dirs[0] / f"{xml_path.stem}.jpg", [], [], xml_path.name, [])
    if not xml_path.is_file():
        raw.problems.append(f"{xml_path} not found (listed in ImageSets/Main)")
        return raw
    try:
        tree = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError as error:
        raw.problems.append(f"{xml_path.name} is not valid XML ({error})")
        return raw
    file_name = (tree.findtext("filename") or f"{xml_path.stem}.jpg").strip()
    raw.image = next(
        (d / file_name for d in image_dirs if (d / file_name).is_file()), image_dirs[0] / file_name
    )
    raw.searched = tuple(d for d in image_dirs if d.is_dir())
    raw.where = f"{xml_path.name} ({file_name})"
    for j, obj in enumerate(tree.findall("object")):
        raw.labels.append((obj.findtext("name") or "").strip())
        raw.crowd.append((obj.findtext("difficult") or "0").strip() == "1")
        raw.bboxes.append(_voc_box(obj.find("bndbox"), j, raw))
    return raw


def _voc_box(bndbox, index: int, raw: RawRecord):
    if bndbox is None:
        raw.problems.append(f"object[{index}] has no bndbox")
        return None
    try:
        xmin, ymin, xmax, ymax = (
            float(bndbox.findtext(tag) or "nan") for tag in ("xmin", "ymin", "xmax", "ymax")
        )
    except ValueError:
        raw.problems.append(f"object[{index}].bndbox holds a value that is not a number")
        return None
    return [xmin - 1, ymin - 1, xmax, ymax]  # 1-based inclusive indices -> pixel edges
