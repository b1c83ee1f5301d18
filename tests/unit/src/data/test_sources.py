"""Real data layouts: COCO's own folders and crowd regions, too few images, Hugging Face's imagefolder
convention, YOLO and Pascal VOC folders. Every fixture is written here (PIL images in tmp dirs)."""

import json
import logging

import pytest
from PIL import Image

from src.data.boxes import format_answer
from src.data.checks import model_and_data_problems
from src.data.dataset import convert_to_conversation_format, load_records
from src.data.records import DatasetError

# COCO's 80 category ids run 1-90 with these ten gaps.
COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_NAMES = {1: "person", 3: "car", 44: "bottle", 62: "chair", 88: "teddy bear", 90: "toothbrush"}
COCO_CATEGORIES = [
    {"id": i, "name": COCO_NAMES.get(i, f"thing{i}"), "supercategory": "x"}
    for i in range(1, 91)
    if i not in COCO_GAPS
]
DENSE_IDS = (1, 3, 44, 62, 88, 90)  # labels the dense images cycle through, the last ids included


def _dense_annotations(image_id: int, count: int, first_id: int) -> list[dict]:
    """`count` boxes with float coordinates in a 640x480 image, in a grid."""
    annotations = []
    for k in range(count):
        x, y = 10.25 + (k % 5) * 120.5, 12.75 + (k // 5) * 90.5
        annotations.append(
            {
                "id": first_id + k,
                "image_id": image_id,
                "category_id": DENSE_IDS[k % len(DENSE_IDS)],
                "bbox": [x, y, 100.5, 80.25],
                "area": 100.5 * 80.25,
                "iscrowd": 0,
            }
        )
    return annotations


def write_coco(path, images_dir, counts=(17, 20), crowd=True, size=(640, 480)) -> dict:
    """A COCO instances file at `path` with one image per count of boxes, images in `images_dir`.

    With crowd, the first image also holds one iscrowd car region of 252x84 (as in val2017)."""
    images_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index, count in enumerate(counts):
        image_id = 1000 + index
        name = f"{image_id:012d}.jpg"
        Image.new("RGB", size, (40 * index, 90, 140)).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        annotations += _dense_annotations(image_id, count, first_id=100 * index + 1)
    if crowd:
        box = [300.0, 380.5, 252.0, 84.0]
        annotations.append(
            {"id": 9999, "image_id": 1000, "category_id": 3, "bbox": box, "area": 252 * 84.0, "iscrowd": 1}
        )
    coco = {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
    path.write_text(json.dumps(coco))
    return coco


# ---------------------------------------------------------------- COCO


def test_coco_layout_finds_images_in_the_split_folder_beside_annotations(tmp_path):
    annotations = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    write_coco(annotations, tmp_path / "coco" / "val2017")
    (train,), _ = load_records(str(annotations), "train")  # two images: one trains, one is held out
    (test,), _ = load_records(str(annotations), "test")
    assert train.image == tmp_path / "coco" / "val2017" / "000000001000.jpg"
    assert (len(train.boxes), len(test.boxes)) == (17, 20)
    # Category ids with gaps map to their names, the last ones included; float coordinates stay floats.
    assert {b.label for b in test.boxes} == {COCO_NAMES[i] for i in DENSE_IDS}
    first = train.boxes[0]
    assert (first.label, first.x1, first.y1, first.x2, first.y2) == ("person", 10.25, 12.75, 110.75, 93.0)


def test_crowd_region_is_no_answer_and_travels_apart(tmp_path):
    annotations = tmp_path / "annotations" / "instances_val2017.json"
    write_coco(annotations, tmp_path / "val2017")
    (record,), _ = load_records(str(annotations), "train")
    (crowd,) = record.crowd_boxes
    assert (crowd.label, crowd.x2 - crowd.x1, crowd.y2 - crowd.y1) == ("car", 252.0, 84.0)
    assert len(record.boxes) == 17 and all(b != crowd for b in record.boxes)
    answer = convert_to_conversation_format(record)["messages"][1]["content"][0]["text"]
    assert answer == format_answer(record.boxes, record.width, record.height)
    assert answer.count("<|box_start|>") == 17


def test_pair_of_instances_files_gives_train_and_test_splits(tmp_path):
    root = tmp_path / "coco"
    write_coco(root / "annotations" / "instances_train2017.json", root / "train2017", counts=(3, 4, 5))
    write_coco(root / "annotations" / "instances_val2017.json", root / "val2017", counts=(6,), crowd=False)
    for source in (root, root / "annotations"):
        train, _ = load_records(str(source), "train")
        (test,), _ = load_records(str(source), "test")
        assert [len(r.boxes) for r in train] == [3, 4, 5] and len(test.boxes) == 6
        assert test.image.parent == root / "val2017"


def test_image_root_finds_images_anywhere_and_the_error_says_where_it_looked(tmp_path):
    annotations = tmp_path / "labels" / "instances_val2017.json"
    write_coco(annotations, tmp_path / "elsewhere" / "pictures")
    with pytest.raises(DatasetError) as error:
        load_records(str(annotations), "train")
    assert "000000001000.jpg not found (looked in" in str(error.value)
    assert "--image-root DIR" in str(error.value)
    (record,), _ = load_records(str(annotations), "train", image_root=tmp_path / "elsewhere" / "pictures")
    assert record.image.parent == tmp_path / "elsewhere" / "pictures"
    with pytest.raises(DatasetError, match="--image-root .*: not a directory"):
        load_records(str(annotations), "train", image_root=tmp_path / "nope")


def test_unknown_category_id_names_the_annotation(tmp_path):
    annotations = tmp_path / "instances_val2017.json"
    coco = write_coco(annotations, tmp_path, counts=(1, 1), crowd=False)
    coco["annotations"][0]["category_id"] = 12  # one of COCO's gaps
    annotations.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="annotation 1: category_id 12 is not in categories"):
        load_records(str(annotations), "train")


# ---------------------------------------------------------------- too few images


def test_one_image_is_refused_before_anything_starts(tmp_path, tiny_model_dir):
    annotations = tmp_path / "annotations" / "instances_val2017.json"
    write_coco(annotations, tmp_path / "val2017", counts=(17,))
    assert len(load_records(str(annotations), "train")[0]) == 1  # training alone could use it
    with pytest.raises(DatasetError) as error:
        load_records(str(annotations), "test")
    message = str(error.value)
    assert f"dataset {annotations}: 1 image(s) and no test split" in message
    assert "Add images" in message and "give a test split" in message
    assert model_and_data_problems(str(tiny_model_dir), str(annotations)) == [message]
    assert model_and_data_problems(str(tiny_model_dir), str(annotations), evaluate=False) == []


def test_two_images_hold_one_out_and_say_so(tmp_path, tiny_model_dir, caplog):
    annotations = tmp_path / "annotations" / "instances_val2017.json"
    write_coco(annotations, tmp_path / "val2017", counts=(17, 20))
    with caplog.at_level(logging.INFO, logger="src.data.records"):
        assert model_and_data_problems(str(tiny_model_dir), str(annotations)) == []
    assert "has no test split: 1 of its 2 images are held out for testing" in caplog.text
    train, _ = load_records(str(annotations), "train")
    test, _ = load_records(str(annotations), "test")
    assert {r.image for r in train}.isdisjoint({r.image for r in test}) and len(train) == len(test) == 1


def test_every_tenth_image_is_held_out_from_larger_sources(tmp_path):
    annotations = tmp_path / "instances_val2017.json"
    write_coco(annotations, tmp_path, counts=(1,) * 25, crowd=False, size=(64, 48))
    coco = json.loads(annotations.read_text())
    for ann in coco["annotations"]:
        ann["bbox"] = [1.5, 2.5, 20.0, 10.0]
    annotations.write_text(json.dumps(coco))
    train, _ = load_records(str(annotations), "train")
    test, _ = load_records(str(annotations), "test")
    assert (len(train), len(test)) == (23, 2)


def test_bad_test_record_stops_the_run_too(tmp_path, tiny_model_dir):
    root = tmp_path / "ds"
    for split, boxes in (("train", [[1, 1, 9, 9]]), ("test", [[9, 9, 1, 1]])):
        (root / split).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(root / split / "a.png")
        row = {"file_name": "a.png", "objects": {"bbox": boxes, "label": ["cat"]}}
        (root / split / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    (problem,) = model_and_data_problems(str(tiny_model_dir), str(root))
    assert "(test): 1 bad record(s)" in problem and "is inverted" in problem


# ---------------------------------------------------------------- Hugging Face imagefolder convention

CARD = """---
dataset_info:
  features:
  - name: image
    dtype: image
  - name: objects
    sequence:
    - name: bbox
      sequence: float32
      length: 4
    - name: category
      dtype:
        class_label:
          names:
            '0': coverall
            '1': face_shield
---
# A detection set
"""


def _imagefolder(tmp_path, rows: list[dict], card: str | None = None):
    root = tmp_path / "hf"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        lines = []
        for index, row in enumerate(rows):
            Image.new("RGB", (200, 100), "white").save(root / split / f"{index}.png")
            lines.append(json.dumps({"file_name": f"{index}.png", **row}))
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    if card:
        (root / "README.md").write_text(card)
    return root


def _boxes(records):
    return [(b.label, b.x1, b.y1, b.x2, b.y2) for r in records for b in r.boxes]


def test_hugging_face_convention_is_coco_xywh_with_class_label_names(tmp_path):
    row = {
        "objects": {
            "id": [7, 8],
            "area": [1, 1],
            "bbox": [[10.5, 20, 30, 40], [0, 0, 200, 100]],
            "category": [1, 0],
        }
    }
    root = _imagefolder(tmp_path, [row], CARD)
    records, _ = load_records(str(root), "train")
    assert _boxes(records) == [("face_shield", 10.5, 20, 40.5, 60), ("coverall", 0, 0, 200, 100)]


def test_category_strings_need_no_card(tmp_path):
    root = _imagefolder(tmp_path, [{"objects": {"bbox": [[10, 20, 30, 40]], "category": ["cat"]}}])
    assert _boxes(load_records(str(root), "train")[0]) == [("cat", 10, 20, 40, 60)]


def test_our_label_files_stay_xyxy_and_a_stated_format_wins(tmp_path):
    rows = [
        {"objects": {"bbox": [[10, 20, 30, 40]], "label": ["cat"]}},
        {
            "objects": {
                "bbox": [[10, 20, 30, 40]],
                "label": ["cat"],
                "category": ["dog"],
                "bbox_format": "xyxy",
            }
        },
        {"objects": {"bbox": [[10, 20, 30, 40]], "label": ["cat"], "bbox_format": "xywh"}},
    ]
    records, _ = load_records(str(_imagefolder(tmp_path, rows)), "test")
    assert _boxes(records) == [("cat", 10, 20, 30, 40), ("dog", 10, 20, 30, 40), ("cat", 10, 20, 40, 60)]


@pytest.mark.parametrize(
    "objects, message",
    [
        (
            {"bbox": [[10, 20, 30, 40]], "label": ["cat"], "category": [0]},
            "objects has both category (Hugging Face's convention: bbox is [x, y, w, h]) and label",
        ),
        (
            {"bbox": [[10, 20, 30, 40]], "category": [0]},
            "objects.category[0] = 0 is a class id, but no class",
        ),
        (
            {"bbox": [[10, 20, 30, 40]], "label": ["cat"], "bbox_format": "cxcywh"},
            "objects.bbox_format = 'cxcywh'",
        ),
        ({"bbox": [[10, 20, 30, 40]]}, "objects has bbox but no category (or label)"),
    ],
)
def test_an_ambiguous_box_format_is_refused_naming_the_field(tmp_path, objects, message):
    with pytest.raises(DatasetError) as error:
        load_records(str(_imagefolder(tmp_path, [{"objects": objects}])), "train")
    assert "record 0 (metadata.jsonl line 1 (0.png))" in str(error.value) and message in str(error.value)


def test_class_ids_beyond_the_card_are_refused(tmp_path):
    root = _imagefolder(tmp_path, [{"objects": {"bbox": [[1, 2, 3, 4]], "category": [5]}}], CARD)
    with pytest.raises(
        DatasetError, match=r"objects.category\[0\] = 5 is not a class id of README.md \(0-1\)"
    ):
        load_records(str(root), "train")


def test_imagefolder_without_a_test_split_holds_out(tmp_path):
    root = _imagefolder(tmp_path, [{"objects": {"bbox": [[1, 2, 3, 4]], "label": ["a"]}}] * 3)
    (root / "test" / "metadata.jsonl").unlink()
    assert (len(load_records(str(root), "train")[0]), len(load_records(str(root), "test")[0])) == (2, 1)


# ---------------------------------------------------------------- YOLO


def _yolo(tmp_path, config: str, labels: dict[str, str], size=(200, 100)):
    root = tmp_path / "yolo"
    for image, text in labels.items():
        path = root / "images" / image
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, "gray").save(path)
        if text is not None:
            label = root / "labels" / image.rsplit(".", 1)[0]
            label = label.with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text)
    (root / "data.yaml").write_text(config)
    return root


def test_yolo_folder_reads_normalised_boxes_polygons_and_splits(tmp_path):
    root = _yolo(
        tmp_path,
        "path: /machine/it/came/from\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n",
        {
            "train/a.jpg": "0 0.5 0.5 0.2 0.4\n1 0.25 0.5 0.1 0.2 0.93\n",  # a box; a box with a confidence
            "train/b.png": "1 0.1 0.1 0.3 0.1 0.3 0.5 0.1 0.5\n",  # a segmentation polygon
            "train/c.png": None,  # no label file: no objects
            "val/d.jpg": "0 0.5 0.5 1.0 1.0\n",
        },
    )
    train, _ = load_records(str(root), "train")
    assert [r.image.name for r in train] == ["a.jpg", "b.png", "c.png"]
    assert _boxes(train) == [
        ("cat", 80.0, 30.0, 120.0, 70.0),
        ("dog", 40.0, 40.0, 60.0, 60.0),
        ("dog", 20.0, 10.0, 60.0, 50.0),
    ]
    (test,), _ = load_records(str(root), "test")
    assert _boxes([test]) == [("cat", 0.0, 0.0, 200.0, 100.0)]


def test_flat_yolo_folder_holds_out_and_refuses_pixel_coordinates(tmp_path):
    root = _yolo(tmp_path, "names: [cat]\n", {"a.jpg": "0 0.5 0.5 0.5 0.5\n", "b.jpg": "0 100 50 20 20\n"})
    (train,), _ = load_records(str(root), "train")
    assert _boxes([train]) == [("cat", 50.0, 25.0, 150.0, 75.0)]
    with pytest.raises(DatasetError, match=r"b.txt line 1: coordinates .* are not normalised to 0-1"):
        load_records(str(root), "test")


def test_yolo_class_outside_names_is_named(tmp_path):
    root = _yolo(tmp_path, "names: [cat]\n", {"a.jpg": "3 0.5 0.5 0.5 0.5\n", "b.jpg": ""})
    with pytest.raises(DatasetError, match=r"a.txt line 1: class 3 is not in data.yaml names \(0-0\)"):
        load_records(str(root), "train")


# ---------------------------------------------------------------- Pascal VOC

VOC_XML = """<annotation>
  <filename>{name}</filename>
  <size><width>200</width><height>100</height><depth>3</depth></size>
  <object><name>dog</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>11</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object>
  <object><name>person</name><difficult>1</difficult>
    <bndbox><xmin>101</xmin><ymin>21</ymin><xmax>150.5</xmax><ymax>100</ymax></bndbox></object>
</annotation>
"""


def _voc(tmp_path, ids: list[str], sets: dict[str, list[str]]):
    root = tmp_path / "VOC2012"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    for image_id in ids:
        Image.new("RGB", (200, 100), "white").save(root / "JPEGImages" / f"{image_id}.jpg")
        (root / "Annotations" / f"{image_id}.xml").write_text(VOC_XML.format(name=f"{image_id}.jpg"))
    for name, listed in sets.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(listed) + "\n")
    return root


def test_voc_folder_uses_its_image_sets_one_based_corners_and_difficult_as_crowd(tmp_path):
    root = _voc(
        tmp_path,
        ["2008_000001", "2008_000002", "2008_000003"],
        {"train": ["2008_000001", "2008_000002"], "val": ["2008_000003"]},
    )
    train, _ = load_records(str(root), "train")
    (test,), _ = load_records(str(root), "test")
    assert [r.image.name for r in train] == ["2008_000001.jpg", "2008_000002.jpg"]
    assert test.image.name == "2008_000003.jpg"
    assert _boxes([test]) == [("dog", 0.0, 10.0, 50.0, 60.0)]
    (difficult,) = test.crowd_boxes
    assert (difficult.label, difficult.x1, difficult.y1, difficult.x2, difficult.y2) == (
        "person",
        100.0,
        20.0,
        150.5,
        100.0,
    )


def test_voc_folder_without_image_sets_holds_out(tmp_path):
    root = _voc(tmp_path, ["a", "b", "c"], {})
    assert (len(load_records(str(root), "train")[0]), len(load_records(str(root), "test")[0])) == (2, 1)
