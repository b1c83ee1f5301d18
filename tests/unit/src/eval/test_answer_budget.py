"""Dense images: the answer budget is sized from the data, cut-off answers are counted, training keeps
whole answers; and crowd regions are ignored through the whole evaluation."""

import json
import random

import pytest
import torch

from src.contract.families import FAMILIES
from src.data.boxes import Box, format_answer
from src.data.dataset import (
    answer_budget,
    answer_labels,
    convert_to_conversation_format,
    load_records,
    longest_answer_tokens,
)
from src.eval import predict as predict_module
from src.eval.evaluate import evaluate_base
from src.eval.predict import DEFAULT_MAX_NEW_TOKENS, answers_cut
from src.planning.pixels import limits_of_processor
from tests.unit.src.data.test_sources import write_coco


@pytest.fixture()
def dense_coco(tmp_path):
    """Train: images of 17 and 3 boxes. Test: one image of 20 boxes and a crowd region."""
    root = tmp_path / "coco"
    write_coco(
        root / "annotations" / "instances_train2017.json", root / "train2017", counts=(17, 3), crowd=False
    )
    write_coco(root / "annotations" / "instances_val2017.json", root / "val2017", counts=(20,), crowd=True)
    return root


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_holds_every_real_answer_with_room_to_spare(dense_coco, tiny_processor, family):
    tokenizer = tiny_processor.tokenizer
    records = load_records(str(dense_coco), "train")[0] + load_records(str(dense_coco), "test")[0]
    labels = [[b.label for b in r.boxes] for r in records]
    longest = longest_answer_tokens(labels, tokenizer, family)
    limits = limits_of_processor(tiny_processor)
    real = [
        _tokens(
            tokenizer,
            convert_to_conversation_format(r, family, pixel_limits=limits)["messages"][1]["content"][0][
                "text"
            ],
        )
        for r in records
    ]
    assert max(real) <= longest  # an upper bound of what the model is taught
    assert answer_budget(longest) >= longest * 1.25 + 1  # a margin, and the end token
    assert answer_budget(longest) > DEFAULT_MAX_NEW_TOKENS  # 20 boxes do not fit the old fixed 256


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_qwen3_budget_covers_many_boxes_at_their_longest(tiny_processor, family):
    tokenizer = tiny_processor.tokenizer
    rng = random.Random(0)
    width, height = 1237, 911
    labels = [rng.choice(["cat", "traffic light", "person", "fire hydrant"]) for _ in range(60)]
    corners = [
        (sorted(rng.uniform(0, width) for _ in "xx"), sorted(rng.uniform(0, height) for _ in "yy"))
        for _ in labels
    ]
    boxes = [Box(label, x1, y1, x2, y2) for label, ((x1, x2), (y1, y2)) in zip(labels, corners, strict=True)]
    edge = [Box(label, width, height, width, height) for label in labels]  # every coordinate 1000
    longest = longest_answer_tokens([labels], tokenizer, family)
    worst = format_answer(edge, width, height, family)
    assert longest == _tokens(tokenizer, worst)  # the worst case, exactly
    assert longest >= _tokens(tokenizer, format_answer(boxes, width, height, family))
    assert answer_budget(longest) >= longest + 1


def test_budget_counts_answers_not_crowd_regions(tmp_path, tiny_processor):
    annotations = tmp_path / "instances_val2017.json"
    write_coco(annotations, tmp_path, counts=(0, 1))  # image 0: only a crowd region
    assert answer_labels(str(annotations), "train") == [[]]
    assert longest_answer_tokens([[]], tiny_processor.tokenizer) == _tokens(tiny_processor.tokenizer, "none")
    assert answer_budget(0) == 32  # a floor for answers of no objects


def test_cut_off_rows_are_those_without_an_end_token():
    end = 7
    rows = torch.tensor([[1, 2, end, 0], [1, 2, 3, 4], [end, 0, 0, 0]])
    assert answers_cut(rows, [end, 0]) == [False, True, False]


def _scripted(monkeypatch, answer_for_size):
    def fake_generate(model, processor, images, device, prompt, max_new_tokens, **_):
        fake_generate.budgets.append(max_new_tokens)
        return [answer_for_size(image.size) for image in images]

    fake_generate.budgets = []
    monkeypatch.setattr(predict_module, "generate_answers", fake_generate)
    return fake_generate.budgets


def test_evaluation_sizes_the_budget_and_ignores_the_crowd_region(
    monkeypatch, dense_coco, tiny_model_dir, tmp_path
):
    (record,), _ = load_records(str(dense_coco), "test")
    (crowd,) = record.crowd_boxes
    # A perfect answer, plus one box on the crowd region: pycocotools would ignore it, and so must we.
    answer = format_answer([*record.boxes, crowd], record.width, record.height)
    budgets = _scripted(monkeypatch, lambda size: answer)
    metrics = evaluate_base(str(tiny_model_dir), str(dense_coco), tmp_path)
    assert (metrics["tp"], metrics["fp"], metrics["fn"], metrics["ignored"]) == (20, 0, 0, 1)
    assert metrics["precision"] == metrics["recall"] == 1.0 and metrics["map_50"] == pytest.approx(1.0)
    assert metrics["intervals"]["precision"]["value"] == 1.0  # the bootstrap ignores it too
    longest = metrics["eval"]["longest_answer_tokens"]
    assert budgets == [answer_budget(longest)] == [metrics["eval"]["max_new_tokens"]]
    assert metrics["truncated"] == 0
    (line,) = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert line["crowd"] == [{"label": "car", "x1": 300.0, "y1": 380.5, "x2": 552.0, "y2": 464.5}]


def test_answers_cut_by_max_new_tokens_are_counted_and_reported(
    tiny_model_dir, tiny_data_dir, tmp_path, caplog
):
    metrics = evaluate_base(
        str(tiny_model_dir), str(tiny_data_dir), tmp_path, max_samples=2, max_new_tokens=1
    )
    assert metrics["truncated"] == 2 and metrics["eval"]["truncated"] == 2
    assert metrics["eval"]["max_new_tokens"] == 1 and metrics["eval"]["longest_answer_tokens"] is None
    assert "2 of 2 answers were cut off at max_new_tokens=1" in caplog.text


def test_training_keeps_a_dense_answer_whole(dense_coco, tiny_processor, tmp_path):
    from src.data.collators import AssistantOnlyCollator
    from src.training.config import StageSettings, create_training_config

    config = create_training_config(StageSettings(output_dir=str(tmp_path), learning_rate=1e-3))
    assert config.max_length is None  # TRL's default 1024 would cut long answers silently
    records, _ = load_records(str(dense_coco), "train")
    sample = convert_to_conversation_format(max(records, key=lambda r: len(r.boxes)))
    batch = AssistantOnlyCollator(tiny_processor)([sample])
    learned = batch["input_ids"][0][batch["labels"][0] != -100]
    text = tiny_processor.tokenizer.decode(learned, skip_special_tokens=False)
    assert text == sample["messages"][1]["content"][0]["text"] + "<|im_end|>"
    assert text.count("<|box_start|>") == 17
