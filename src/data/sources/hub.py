"""A hub data set by name (needs a network): the `datasets` object-detection convention, `image` plus
`objects` with `bbox` [x, y, w, h] and a ClassLabel `category`."""

from __future__ import annotations

from src.data.records import TEST_SPLIT_NAMES, DatasetError, NoOwnSplit, RawRecord, holdout, xywh_to_xyxy


def read_hub(name: str, split: str) -> list[RawRecord]:
    import datasets

    try:
        available = datasets.get_dataset_split_names(name)
    except Exception as error:  # offline, unknown name, gated: all mean "cannot use it"
        raise DatasetError(
            f"--dataset {name}: not a local folder or .json file, and the hub dataset "
            f"could not be reached ({type(error).__name__}); pass a local path"
        ) from None
    own = [s for s in TEST_SPLIT_NAMES if s in available]
    held = {
        "test": own[0] if own else None,
        "validation": own[1] if own[:1] == ["test"] and own[1:] else None,
    }
    if split == "validation" and held["validation"] is None:
        raise NoOwnSplit(f"{name}: no validation split of its own")
    wanted = "train" if split == "train" or held["test"] is None else str(held[split])
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
                [xywh_to_xyxy(b) for b in objects["bbox"]],
                labels,
                f"{name}[{wanted}] row {index}",
                [bool(c) for c in crowd] if crowd is not None else None,
            )
        )
    return records if held["test"] is not None else holdout(records, split, name)
