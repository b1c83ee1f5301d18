"""Loaders, up-front validation and conversation format of detection records."""

import json
import shutil

import pytest
from PIL import Image

from src.data.boxes import parse_answer
from src.data.dataset import _has_image, convert_to_conversation_format, load_records
from src.data.records import DatasetError


def _folder(tmp_path, objects_per_image, size=(100, 80), test_split=True):
    """An imagefolder with these train images, and (unless test_split=False) a one-image test split."""
    splits = {"train": objects_per_image, "test": [([[1, 1, 9, 9]], ["ok"])] if test_split else None}
    for name, objects in splits.items():
        if objects is None:
            continue
        split = tmp_path / "ds" / name
        split.mkdir(parents=True)
        lines = []
        for index, (bboxes, labels) in enumerate(objects):
            Image.new("RGB", size, "white").save(split / f"{index}.png")
            lines.append(
                json.dumps({"file_name": f"{index}.png", "objects": {"bbox": bboxes, "label": labels}})
            )
        (split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "ds"


def test_imagefolder_records_keep_pixels_and_labels(tiny_data_dir):
    records, skipped = load_records(str(tiny_data_dir), "train")
    assert len(records) == 16 and skipped == 0
    first = records[0]
    assert (first.width, first.height) == (112, 112)
    assert first.boxes and all(b.label and b.x1 < b.x2 and b.y1 < b.y2 for b in first.boxes)


def test_conversation_is_qwen2_vl_grounding_with_clamped_0_1000(tmp_path):
    root = _folder(tmp_path, [([[0, 0, 50, 40], [50, 40, 100.5, 80]], ["cat", "dog"])])
    (record,), _ = load_records(str(root), "train")
    sample = convert_to_conversation_format(record)
    answer = sample["messages"][1]["content"][0]["text"]
    assert answer == (
        "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|>"
        "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(500,500),(1000,1000)<|box_end|>"
    )
    assert _has_image(sample) and sample["images"] == [str(record.image)]
    back = parse_answer(answer, record.width, record.height)
    assert [(b.label, b.x1, b.y2) for b in back.boxes] == [("cat", 0, 40), ("dog", 50, 80)]


def test_qwen2_5_vl_answer_is_json_in_resized_pixels(tmp_path):
    root = _folder(tmp_path, [([[10, 10, 60, 50]], ["cat"])], size=(100, 80))
    (record,), _ = load_records(str(root), "train")
    sample = convert_to_conversation_format(record, "qwen2_5_vl", pixel_limits=(56 * 56, 112 * 112))
    items = json.loads(sample["messages"][1]["content"][0]["text"])
    assert items[0]["label"] == "cat" and len(items[0]["bbox_2d"]) == 4


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_qwen3_answer_is_json_on_0_1000_of_the_original_image_whatever_the_resize(tmp_path, family):
    root = _folder(tmp_path, [([[10, 10, 60, 50]], ["cat"])], size=(100, 80))
    (record,), _ = load_records(str(root), "train")
    samples = [
        convert_to_conversation_format(record, family, pixel_limits=limits)
        for limits in (None, (56 * 56, 112 * 112), (56 * 56, 28 * 28 * 16384))
    ]
    answers = {sample["messages"][1]["content"][0]["text"] for sample in samples}
    assert answers == {'[{"bbox_2d": [100, 125, 600, 625], "label": "cat"}]'}
    (box,) = parse_answer(answers.pop(), record.width, record.height, family).boxes
    assert (box.label, box.x1, box.y1, box.x2, box.y2) == ("cat", 10, 10, 60, 50)


@pytest.mark.parametrize(
    "bbox, label, message",
    [
        ([10, 10, 5, 20], "cat", "objects.bbox[0] = [10, 10, 5, 20] is inverted"),
        ([10, 10, 500, 20], "cat", "lies outside the 100x80 image"),
        ([10, 10, 20], "cat", "is not four numbers"),
        ([10, 10, 20, 20], " ", "objects.label[0] = ' ' is empty"),
    ],
)
def test_bad_box_or_label_names_record_and_field(tmp_path, bbox, label, message):
    root = _folder(tmp_path, [([[1, 1, 9, 9]], ["ok"]), ([bbox], [label])])
    with pytest.raises(DatasetError) as error:
        load_records(str(root), "train")
    text = str(error.value)
    assert "record 1 (metadata.jsonl line 2 (1.png))" in text and message in text
    assert "--skip-bad-records" in text


def test_missing_and_unreadable_images(tmp_path):
    root = _folder(tmp_path, [([[1, 1, 9, 9]], ["a"])] * 3)
    (root / "train" / "1.png").unlink()
    (root / "train" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as error:
        load_records(str(root), "train")
    assert "record 1" in str(error.value) and "not found" in str(error.value)
    assert "record 2" in str(error.value) and "unreadable" in str(error.value)
    records, skipped = load_records(str(root), "train", skip_bad=True)
    assert (len(records), skipped) == (1, 2)


def test_missing_dataset_and_empty_split(tmp_path):
    with pytest.raises(DatasetError, match="no train/metadata.jsonl"):
        load_records(str(tmp_path), "train")
    root = _folder(tmp_path, [])
    with pytest.raises(DatasetError, match="no usable records"):
        load_records(str(root), "train")
    with pytest.raises(DatasetError, match="file not found"):
        load_records(str(tmp_path / "nope.json"), "train")


def test_coco_json_converts_xywh_and_holds_out_every_tenth(tmp_path, tiny_data_dir):
    images, annotations = [], []
    for index in range(10):
        shutil.copy(tiny_data_dir / "train" / f"{index:06d}.png", tmp_path / f"{index}.png")
        images.append({"id": index, "file_name": f"{index}.png", "width": 112, "height": 112})
        annotations.append({"id": index, "image_id": index, "bbox": [10, 20, 30, 40], "category_id": 7})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "widget"}]}
    (tmp_path / "train.json").write_text(json.dumps(coco))
    train, _ = load_records(str(tmp_path / "train.json"), "train")
    test, _ = load_records(str(tmp_path / "train.json"), "test")
    assert (len(train), len(test)) == (9, 1)
    box = train[0].boxes[0]
    assert (box.label, box.x1, box.y1, box.x2, box.y2) == ("widget", 10, 20, 40, 60)
