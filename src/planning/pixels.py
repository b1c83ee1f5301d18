"""Image geometry: how Qwen's processor resizes an image, the pixel limits a run resizes to, and what an
image costs in vision patches and LLM tokens. Torch-free; the data, the planner, the loader and
evaluation all resize by these rules, so training, planning and the box answers agree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """The (h, w) Qwen's image processor resizes an image to; same rule as transformers' qwen2_vl one.

    Both sides become multiples of ``factor`` with the area inside [min_pixels, max_pixels] and the aspect
    ratio kept as closely as possible. Raises ValueError for aspect ratios above 200, as transformers does.
    """
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# Qwen's processor defaults (transformers Qwen2VLImageProcessor; src/fixtures/shapes.py).
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280


def image_grid(
    width: int, height: int, min_pixels: int, max_pixels: int, patch: int = 14, merge: int = 2
) -> tuple[int, int]:
    """(vision patches, LLM image tokens) of one image, after Qwen's smart_resize."""
    h_bar, w_bar = smart_resize(height, width, patch * merge, min_pixels, max_pixels)
    patches = (h_bar // patch) * (w_bar // patch)  # grid_t = 1 for an image
    return patches, patches // merge**2


# Training's default cap on an image's pixels: 1280 image tokens (1280 x 28 x 28), as fine-tuning guides use.
# The hub's Qwen2-VL processors allow 12,845,056 (16,384 tokens): a 1920x1080 photo would be ~2,700 tokens.
TRAIN_MAX_PIXELS = 28 * 28 * 1280


def pixel_limits(
    model_limits: tuple[int, int], min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[int, int]:
    """(min, max) pixels a run resizes images to: the flags where given, else the model processor's
    own, its maximum capped at TRAIN_MAX_PIXELS (a processor made for small images keeps its smaller one)."""
    low, high = model_limits
    return min_pixels or low, max_pixels or min(high, TRAIN_MAX_PIXELS)


def limits_from_config(model_dir) -> tuple[int, int]:
    """(min_pixels, max_pixels) from preprocessor_config.json; explicit min/max_pixels win over `size`."""
    path = Path(model_dir) / "preprocessor_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    size = config.get("size") or {}
    low = config.get("min_pixels") or size.get("shortest_edge") or DEFAULT_MIN_PIXELS
    high = config.get("max_pixels") or size.get("longest_edge") or DEFAULT_MAX_PIXELS
    return int(low), int(high)


def limits_of_processor(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) a loaded processor resizes to."""
    size = processor.image_processor.size
    return size["shortest_edge"], size["longest_edge"]
