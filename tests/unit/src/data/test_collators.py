"""Exact label masks on a real processed batch of the tiny Qwen2-VL."""

import pytest

from src.data.collators import IGNORE_INDEX, AllTokensCollator, AssistantOnlyCollator
from src.data.dataset import build_dataset


@pytest.fixture(scope="module")
def samples(tiny_data_dir, tiny_processor):
    dataset, _ = build_dataset(str(tiny_data_dir), "test", "qwen2_vl", tiny_processor)
    by_length = sorted(dataset, key=lambda s: len(s["messages"][1]["content"][0]["text"]))
    return [by_length[0], by_length[-1]]  # different lengths, so the batch needs padding


def _kept_text(processor, batch, row):
    ids = batch["input_ids"][row]
    return processor.tokenizer.decode(ids[batch["labels"][row] != IGNORE_INDEX])


def test_assistant_only_labels_exactly_the_answer_and_end_of_turn(tiny_processor, samples):
    batch = AssistantOnlyCollator(tiny_processor)(samples)
    assert "mm_token_type_ids" in batch and "pixel_values" in batch
    for row, sample in enumerate(samples):
        answer = sample["messages"][1]["content"][0]["text"]
        assert _kept_text(tiny_processor, batch, row) == answer + "<|im_end|>"


def test_all_tokens_labels_everything_but_padding_and_vision(tiny_processor, samples):
    batch = AllTokensCollator(tiny_processor)(samples)
    tokenizer = tiny_processor.tokenizer
    vision = set(tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]))
    for row in range(len(samples)):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        for token, label, real in zip(ids.tolist(), labels.tolist(), mask.tolist(), strict=True):
            expect_ignored = (not real) or token in vision
            assert (label == IGNORE_INDEX) == expect_ignored
    assert (batch["attention_mask"] == 0).any()  # the two samples differ in length: padding was masked
    text = _kept_text(tiny_processor, batch, 0)
    assert text.startswith("<|im_start|>system") and "<|image_pad|>" not in text
