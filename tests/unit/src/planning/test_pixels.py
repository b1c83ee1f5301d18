"""Image resolution: --max-pixels / --min-pixels set how images are resized for training, planning,
evaluation and box answers alike, with a default cap of 1280 image tokens."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from src.data.boxes import Box, format_answer, parse_answer
from src.planning.pixels import (
    TRAIN_MAX_PIXELS,
    image_grid,
    limits_of_preprocessor,
    patch_geometry,
    pixel_limits,
    smart_resize,
    train_max_pixels,
)
from src.planning.shapes import QWEN3_VL_8B_CONFIG, QWEN3_VL_PREPROCESSOR

HUB_LIMITS = (3136, 12_845_056)  # the hub's Qwen2-VL preprocessor_config.json
QWEN3_VL_LIMITS = limits_of_preprocessor(QWEN3_VL_PREPROCESSOR)  # (65,536, 16,777,216)


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


# --- Qwen3-VL and Qwen3.5: patch 16, resize factor 32 ---------------------------------------------------


def test_qwen3_images_resize_to_multiples_of_32_capped_at_1280_tokens_of_32x32_pixels():
    assert QWEN3_VL_LIMITS == (65_536, 16_777_216)
    assert train_max_pixels(32) == 32 * 32 * 1280 == 1_310_720 and train_max_pixels() == TRAIN_MAX_PIXELS
    low, high = pixel_limits(QWEN3_VL_LIMITS, factor=32)
    assert (low, high) == (65_536, 1_310_720)
    assert smart_resize(476, 644, 32) == (480, 640)  # 644x476: a 30 x 40 patch grid, 300 tokens
    assert image_grid(644, 476, low, high, 16, 2) == (1200, 300)
    # a 1920x1080 photo: ~2,000 tokens at the hub's limit, at most 1,280 under the cap of its own factor;
    # the factor-28 cap (1,003,520 pixels) would give Qwen3 images only ~980 tokens
    assert image_grid(1920, 1080, *QWEN3_VL_LIMITS, 16, 2)[1] > 2000
    assert 1200 < image_grid(1920, 1080, low, high, 16, 2)[1] <= 1280
    assert image_grid(1920, 1080, *pixel_limits(QWEN3_VL_LIMITS), 16, 2)[1] < 1000
    assert image_grid(20, 20, low, high, 16, 2) == (256, 64)  # scaled up to min_pixels: 256 x 256


@pytest.mark.parametrize("size", [(644, 476), (1920, 1080), (20, 20), (4000, 3000), (333, 777)])
def test_the_planner_counts_the_grid_qwen3_vl_s_image_processor_makes(size):
    """transformers' image processor with Qwen3-VL's preprocessor_config.json and the capped limits."""
    from transformers import Qwen2VLImageProcessor

    low, high = pixel_limits(QWEN3_VL_LIMITS, factor=32)
    names = ("image_processor_type", "processor_class")
    settings = {key: value for key, value in QWEN3_VL_PREPROCESSOR.items() if key not in names}
    processor = Qwen2VLImageProcessor(**{**settings, "size": {"shortest_edge": low, "longest_edge": high}})
    grid = processor(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"][0].tolist()
    t, h, w = grid
    assert (t * h * w, t * h * w // 4) == image_grid(*size, low, high, 16, 2)


def test_patch_geometry_is_read_from_the_model_folder(tmp_path):
    assert patch_geometry(tmp_path) == (14, 2)  # nothing there: Qwen2-VL's
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_VL_8B_CONFIG))
    assert patch_geometry(tmp_path) == (16, 2)  # the vision config's
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**QWEN3_VL_PREPROCESSOR, "patch_size": 8}))
    assert patch_geometry(tmp_path) == (8, 2)  # the processor's own wins: it is what resizes
