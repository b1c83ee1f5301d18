"""COCO instances files: one file (held out from), or a folder whose instances_train*.json and
instances_val*.json are the two splits. Images are found beside the file, in images/, in COCO's own layout
(annotations/instances_val2017.json with val2017/ beside annotations/), or under --image-root.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from src.data.records import DatasetError, NoOwnSplit, RawRecord, holdout, xywh_to_xyxy


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


def read_coco_folder(
    files: dict[str, Path], split: str, source: str, image_root: Path | None
) -> list[RawRecord]:
    """A train file and a test (else val) file are the train and test splits, and a val file beside both the
    validation split; one file alone is held out from."""
    held = {
        "test": files.get("test") or files.get("val"),
        "validation": files.get("val") if "test" in files else None,
    }
    if split == "validation" and ("train" not in files or held["validation"] is None):
        raise NoOwnSplit(f"{source}: no validation split of its own")
    if "train" in files and held["test"] is not None:
        return read_coco(files["train"] if split == "train" else held[split], image_root)
    only = next(files[role] for role in ("train", "val", "test") if role in files)
    return holdout(read_coco(only, image_root), split, source)


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


def read_coco(path: Path, image_root: Path | None = None) -> list[RawRecord]:
    coco = _coco_json(str(path), path.stat().st_mtime_ns)
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DatasetError(f"{path}: not a COCO instances file (no 'images' list)")
    names = {c.get("id"): c.get("name") for c in coco.get("categories", []) if isinstance(c, dict)}
    by_image: dict = {img.get("id"): RawRecord(None, [], [], "", []) for img in coco["images"]}
    for ann in coco.get("annotations", []):
        raw = by_image.get(ann.get("image_id"))
        if raw is None:
            continue  # an annotation of an image the file does not list: pycocotools ignores it too
        raw.bboxes.append(xywh_to_xyxy(ann.get("bbox")))
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
