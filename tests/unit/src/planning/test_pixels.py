"""Image resolution: --max-pixels / --min-pixels set how images are resized for training, planning,
evaluation and box answers alike, with a default cap of 1280 image tokens."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from src.data.boxes import Box, format_answer, parse_answer
from src.planning.pixels import TRAIN_MAX_PIXELS, image_grid, pixel_limits, smart_resize

HUB_LIMITS = (3136, 12_845_056)  # the hub's Qwen2-VL preprocessor_config.json


def test_the_default_caps_a_large_processor_and_keeps_a_small_one():
    assert pixel_limits(HUB_LIMITS) == (3136, TRAIN_MAX_PIXELS)
    assert pixel_limits((3136, 19_600)) == (3136, 19_600)  # a processor made for small images
    assert pixel_limits(HUB_LIMITS, 6272, 401_408) == (6272, 401_408)  # the flags win
    # a 1920x1080 photo: about 2,700 image tokens at the hub's limit, at most 1,280 under the cap
    assert image_grid(1920, 1080, *HUB_LIMITS)[1] > 2600
    assert image_grid(1920, 1080, *pixel_limits(HUB_LIMITS))[1] <= 1280


def test_a_1920x1080_image_under_max_pixels_1003520_is_at_most_1280_tokens(tiny_model_dir):
    from src.models.loader import load_processor

    processor = load_processor(str(tiny_model_dir), max_pixels=1_003_520)
    grid = processor.image_processor(images=[Image.new("RGB", (1920, 1080))], return_tensors="pt")
    t, h, w = grid["image_grid_thw"][0].tolist()
    assert t * h * w // 4 <= 1280
    assert t * h * w // 4 == image_grid(1920, 1080, 3136, 1_003_520)[1]  # the planner counts the same


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_boxes_round_trip_within_one_pixel_at_the_capped_resolution(family):
    width, height = 1920, 1080
    resized = smart_resize(height, width, 28, 3136, 1_003_520)
    rng = random.Random(0)
    boxes = []
    for index in range(20):
        x1, y1 = rng.uniform(0, width - 50), rng.uniform(0, height - 50)
        boxes.append(Box(f"thing {index}", x1, y1, rng.uniform(x1 + 10, width), rng.uniform(y1 + 10, height)))
    answer = format_answer(boxes, width, height, family, resized)
    parsed = parse_answer(answer, width, height, family, resized)
    assert parsed.parsed and len(parsed.boxes) == len(boxes)
    for sent, back in zip(boxes, parsed.boxes, strict=True):
        for corner in ("x1", "y1", "x2", "y2"):
            assert abs(getattr(sent, corner) - getattr(back, corner)) <= 1.0, (family, corner)
