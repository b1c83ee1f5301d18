"""The demo's base: synthetic domains, the tiny detector's config, and pretraining from scratch.

The slow tests train for real (a few steps): the loss falls and every part of the model moves, since
pretraining is full training, not LoRA; the fixture builder caches what it built.
"""

import json
import random

import pytest

from src.data.synthetic import DOMAINS, RGB, SHAPES, make_image, write_dataset
from src.models import pretrain as pretrain_module
from src.models.tiny import DETECTOR_SIZE, build_config, build_tokenizer


def test_same_seed_writes_the_same_data_set(tmp_path):
    first = write_dataset(tmp_path / "a", train=3, test=2, domain="target", seed=5, max_objects=1)
    second = write_dataset(tmp_path / "b", train=3, test=2, domain="target", seed=5, max_objects=1)
    for split in ("train", "test"):
        assert (first / split / "metadata.jsonl").read_text() == (
            second / split / "metadata.jsonl"
        ).read_text()
        assert (first / split / "000000.png").read_bytes() == (second / split / "000000.png").read_bytes()


def test_target_colours_are_new_and_its_background_is_noisy():
    source, target = DOMAINS["source"], DOMAINS["target"]
    assert not set(source["colours"]) & set(target["colours"])
    flat, _ = make_image(random.Random(0), "source", (140, 140), 1, (0.3, 0.6))
    noisy, objects = make_image(random.Random(0), "target", (140, 140), 1, (0.3, 0.6))
    assert len(flat.getcolors(maxcolors=10_000) or []) <= 50  # background + shape + anti-aliasing
    assert len(noisy.getcolors(maxcolors=100_000)) > 1000
    ((label, (x1, y1, x2, y2)),) = objects
    side = x2 - x1
    assert label.split()[0] in target["colours"] and 0.3 * 140 <= side <= 0.6 * 140 and y2 - y1 == side


def test_every_label_is_whole_word_tokens():
    tokenizer = build_tokenizer()
    for colour in RGB:
        for shape in SHAPES:
            assert tokenizer.tokenize(f"{colour} {shape}") == [colour, f"Ġ{shape}"]
    assert {c for spec in DOMAINS.values() for c in spec["colours"]} <= set(RGB)


def test_detector_config_gives_height_and_width_usable_rope_frequencies():
    config = build_config(build_tokenizer(), **DETECTOR_SIZE)
    rope = config.text_config.rope_parameters
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(rope["mrope_section"]) == head_dim // 2
    assert rope["mrope_section"][1] + rope["mrope_section"][2] > rope["mrope_section"][0]

    def slowest_width_turn(theta: float) -> float:  # radians across the 5 columns of image tokens
        return 5 * theta ** (-2 * (head_dim // 2 - 1) / head_dim)

    assert slowest_width_turn(rope["rope_theta"]) > 0.25
    assert slowest_width_turn(10000.0) < 0.01  # Qwen2-VL's usual theta: positions all look alike
    with pytest.raises(ValueError, match="mrope_section"):
        build_config(build_tokenizer(), hidden=128, mrope_section=(4, 4, 4))


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [pretrain_module._lr_factor(s, 100, 5) for s in range(100)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == 1.0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False)) and factors[-1] < 0.01


@pytest.mark.slow
def test_pretraining_trains_every_part_and_lowers_the_loss(tiny_model_dir, tiny_data_dir, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    out = pretrain_module.pretrain_tiny_detector(
        tiny_model_dir, tiny_data_dir, tmp_path / "pretrained", steps=30, batch_size=4, log_every=1
    )
    summary = json.loads((out / "pretraining.json").read_text())
    losses = [row["loss"] for row in summary["history"]]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    before = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir)).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(str(out)).state_dict()
    for name in (
        "model.visual.patch_embed.proj.weight",
        "model.visual.blocks.0.attn.qkv.weight",
        "model.visual.merger.mlp.0.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
    ):
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
    assert (out / "preprocessor_config.json").is_file() or (out / "processor_config.json").is_file()


@pytest.mark.slow
def test_detector_fixtures_are_built_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_module, "SOURCE_SPLITS", {"train": 8, "test": 2})
    monkeypatch.setattr(pretrain_module, "TARGET_SPLITS", {"train": 4, "test": 2})
    model, target, source = pretrain_module.build_detector_fixtures(tmp_path, steps=2)
    summary = model / "pretraining.json"
    assert json.loads(summary.read_text())["steps"] == 2
    for data, domain in ((target, "target"), (source, "source")):
        rows = [json.loads(line) for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
        labels = [label for row in rows for label in row["objects"]["label"]]
        assert len(labels) == len(rows) and {label.split()[0] for label in labels} <= set(
            DOMAINS[domain]["colours"]
        )
    assert not (tmp_path / pretrain_module.INIT_DIR).exists()
    assert json.loads(summary.read_text())["source_test"]["num_images"] == 2
    stamp = summary.stat().st_mtime_ns
    pretrain_module.build_detector_fixtures(tmp_path, steps=2)
    assert summary.stat().st_mtime_ns == stamp
    pretrain_module.build_detector_fixtures(tmp_path, steps=3)  # other settings: built again
    assert json.loads(summary.read_text())["steps"] == 3
