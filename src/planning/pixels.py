"""Image geometry: how Qwen's processor resizes an image, the pixel limits a run resizes to, and what an
image costs in vision patches and LLM tokens. Torch-free; the data, the planner, the loader and
evaluation all resize by these rules, so training, planning and the box answers agree.

Both sides of a resized image are multiples of patch_size x merge_size, the resize factor: 28 for
Qwen2-VL and Qwen2.5-VL (patch 14), 32 for Qwen3-VL and Qwen3.5 (patch 16). One LLM image token covers
factor x factor pixels, so the cap of 1280 image tokens is 1280 x factor^2 pixels.
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


# Training's default cap on an image's pixels: 1280 image tokens, as fine-tuning guides use. The hub's
# Qwen2-VL processors allow 12,845,056 pixels (16,384 tokens): a 1920x1080 photo would be ~2,700 tokens.
TRAIN_MAX_IMAGE_TOKENS = 1280
QWEN2_FACTOR = 28  # patch 14 x merge 2


def train_max_pixels(factor: int = QWEN2_FACTOR) -> int:
    """The cap in pixels for a resize factor: 1280 tokens of factor x factor pixels."""
    return factor * factor * TRAIN_MAX_IMAGE_TOKENS


TRAIN_MAX_PIXELS = train_max_pixels(QWEN2_FACTOR)  # Qwen2-VL's and Qwen2.5-VL's: 1,003,520


def pixel_limits(
    model_limits: tuple[int, int],
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    factor: int = QWEN2_FACTOR,
) -> tuple[int, int]:
    """(min, max) pixels a run resizes images to: the flags where given, else the model processor's
    own, its maximum capped at 1280 image tokens of the model's resize factor (train_max_pixels; a
    processor made for small images keeps its smaller one)."""
    low, high = model_limits
    return min_pixels or low, max_pixels or min(high, train_max_pixels(factor))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def limits_from_config(model_dir) -> tuple[int, int]:
    """(min_pixels, max_pixels) from preprocessor_config.json; explicit min/max_pixels win over `size`."""
    return limits_of_preprocessor(_read_json(Path(model_dir) / "preprocessor_config.json"))


def limits_of_preprocessor(config: dict) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a preprocessor_config.json's values (Qwen's defaults where absent)."""
    size = config.get("size") or {}
    low = config.get("min_pixels") or size.get("shortest_edge") or DEFAULT_MIN_PIXELS
    high = config.get("max_pixels") or size.get("longest_edge") or DEFAULT_MAX_PIXELS
    return int(low), int(high)


def limits_of_processor(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) a loaded processor resizes to."""
    size = processor.image_processor.size
    return size["shortest_edge"], size["longest_edge"]


def patch_geometry(model_dir) -> tuple[int, int]:
    """(patch_size, merge_size) a model's images are cut by: its preprocessor_config.json's, else its
    config.json's vision_config's, else Qwen2-VL's 14 and 2. The resize factor is their product."""
    preprocessor = _read_json(Path(model_dir) / "preprocessor_config.json")
    vision = _read_json(Path(model_dir) / "config.json").get("vision_config") or {}
    patch = preprocessor.get("patch_size") or vision.get("patch_size") or 14
    merge = preprocessor.get("merge_size") or vision.get("spatial_merge_size") or 2
    return int(patch), int(merge)


def geometry_of_processor(processor) -> tuple[int, int]:
    """(patch_size, merge_size) of a loaded processor (Qwen2-VL's 14 and 2 where it does not say)."""
    image_processor = processor.image_processor
    return getattr(image_processor, "patch_size", 14), getattr(image_processor, "merge_size", 2)


def factor_of_processor(processor) -> int:
    """The resize factor (patch_size x merge_size) of a loaded processor."""
    patch, merge = geometry_of_processor(processor)
    return patch * merge
