"""Three splits: a source's own validation and test splits where it has both; else its one held-out split
is the test split and the validation split is carved from train, deterministically, never overlapping."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from src.data.dataset import load_records, read_raw_records, split_sizes
from src.data.records import MIN_VALIDATION_IMAGES, DatasetError, carve_validation
from tests.unit.src.data.test_sources import _voc, _yolo, write_coco


def folder(tmp_path, splits: dict[str, int]):
    """An imagefolder with `count` images in each named split folder (each image told apart by name)."""
    root = tmp_path / "data"
    for split, count in splits.items():
        (root / split).mkdir(parents=True)
        lines = []
        for index in range(count):
            name = f"{split}-{index}.png"
            Image.new("RGB", (64, 48), "white").save(root / split / name)
            lines.append(
                json.dumps({"file_name": name, "objects": {"bbox": [[4, 4, 30, 30]], "label": ["box"]}})
            )
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


def names(records) -> list[str]:
    return [str(r.image).rsplit("/", 1)[-1] for r in records]


def test_the_carved_validation_split_is_spread_evenly_and_the_same_every_time():
    train, validation = carve_validation(list(range(40)), 0.1, "d")
    assert validation == [5, 15, 25, 35] and len(train) == 36 and not set(train) & set(validation)
    assert carve_validation(list(range(40)), 0.1, "d") == (train, validation)
    _, small = carve_validation(list(range(9)), 0.1, "d")
    assert len(small) == MIN_VALIDATION_IMAGES  # at least a few, whatever the share


def test_too_few_images_to_carve_a_validation_split_name_the_data_set():
    with pytest.raises(DatasetError, match=r"dataset tiny-set: 7 training image\(s\) are too few"):
        carve_validation(list(range(7)), 0.1, "tiny-set")


def test_with_one_held_out_split_it_is_the_test_and_validation_comes_out_of_train(tmp_path):
    data = folder(tmp_path, {"train": 30, "test": 6})
    train = names(read_raw_records(data, "train", val_fraction=0.1))
    validation = names(read_raw_records(data, "validation", val_fraction=0.1))
    test = names(read_raw_records(data, "test", val_fraction=0.1))
    assert len(train) == 26 and len(validation) == 4 and len(test) == 6
    assert not set(train) & set(validation) and not (set(train) | set(validation)) & set(test)
    assert all(n.startswith("test-") for n in test)
    # Without a search the train split is whole and there is no validation split.
    assert len(read_raw_records(data, "train")) == 30
    with pytest.raises(DatasetError, match="no validation split without --val-fraction"):
        read_raw_records(data, "validation")


def test_a_source_with_validation_and_test_splits_uses_both_as_they_are(tmp_path):
    data = folder(tmp_path, {"train": 12, "validation": 5, "test": 6})
    assert names(read_raw_records(data, "validation", val_fraction=0.1)) == [
        f"validation-{i}.png" for i in range(5)
    ]
    assert len(read_raw_records(data, "train", val_fraction=0.1)) == 12
    assert all(n.startswith("test-") for n in names(read_raw_records(data, "test", val_fraction=0.1)))
    sizes = split_sizes(data, val_fraction=0.1)
    assert sizes["validation"] == {"images": 5, "how": "the source's own validation split"}


def test_a_source_without_a_held_out_split_holds_out_the_test_then_carves_validation(tmp_path):
    data = folder(tmp_path, {"train": 50})
    test = set(names(read_raw_records(data, "test", val_fraction=0.1)))
    validation = set(names(read_raw_records(data, "validation", val_fraction=0.1)))
    train = set(names(read_raw_records(data, "train", val_fraction=0.1)))
    assert len(test) == 5 and len(validation) == 4 and len(train) == 41
    assert not train & validation and not train & test and not validation & test
    sizes = split_sizes(data, val_fraction=0.1)
    assert (
        sizes["test"]["how"].startswith("held out")
        and "carved from the train split" in sizes["validation"]["how"]
    )
    assert sizes["train"] == {"images": 41, "how": "the source's train split, less the validation split"}


def test_coco_val_beside_test_is_the_validation_split(tmp_path):
    for split, counts in (("train", (1,) * 9), ("val", (2, 2)), ("test", (3, 3, 3))):
        write_coco(
            tmp_path / "annotations" / f"instances_{split}2017.json", tmp_path / f"{split}2017", counts, False
        )
    records = {
        split: load_records(str(tmp_path), split, val_fraction=0.1)[0]
        for split in ("train", "validation", "test")
    }
    assert [len(records[s]) for s in ("train", "validation", "test")] == [9, 2, 3]


def test_yolo_val_beside_test_is_the_validation_split(tmp_path):
    labels = {
        f"{split}/{i}.jpg": "0 0.5 0.5 0.2 0.2\n"
        for split, n in (("train", 8), ("val", 2), ("test", 3))
        for i in range(n)
    }
    root = _yolo(tmp_path, "names: [box]\ntrain: images/train\nval: images/val\ntest: images/test\n", labels)
    sizes = {
        split: len(read_raw_records(str(root), split, val_fraction=0.1))
        for split in ("train", "validation", "test")
    }
    assert sizes == {"train": 8, "validation": 2, "test": 3}


def test_voc2007_trains_on_train_with_val_as_validation_and_on_trainval_without_a_search(tmp_path):
    ids = [f"{i:03d}" for i in range(12)]
    root = str(_voc(tmp_path, ids, {"train": ids[:6], "val": ids[6:9], "trainval": ids[:9], "test": ids[9:]}))
    assert len(read_raw_records(root, "train")) == 9  # trainval, as before
    assert len(read_raw_records(root, "train", val_fraction=0.1)) == 6
    assert len(read_raw_records(root, "validation", val_fraction=0.1)) == 3
    assert len(read_raw_records(root, "test", val_fraction=0.1)) == 3
