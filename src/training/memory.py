"""What the training core needs to know of a data set's images at training time, read from the files'
headers (PIL opens lazily; nothing is decoded): its largest sample, for the memory planner
(`src/planning/memory.py`, through `levers.resolve_checkpointing` with src/utils/gpu.py's
available_gpu_bytes, and the benchmark), and every sample's vision patches, the key the size-grouped
sampler orders by (`src/training/size_groups.py`).
"""

from __future__ import annotations

from collections.abc import Callable

SAMPLES_TO_SIZE = 64  # enough to find the largest image of a data set of one resolution or a few


def largest_sample(dataset, processor, limit: int = SAMPLES_TO_SIZE) -> tuple[int, int]:
    """(image patches, text tokens) of the largest of the first `limit` samples.

    Image sizes come from the files' headers; text tokens from the chat template, where each image is
    still one placeholder token.
    """
    count = patch_counter(processor)
    patches = text_tokens = 0
    for row in dataset.select(range(min(limit, len(dataset)))):
        patches = max(patches, sum(count(image) for image in row.get("images") or []))
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        text_tokens = max(text_tokens, len(processor.tokenizer(text)["input_ids"]))
    return patches, text_tokens


def image_patches(dataset, processor) -> list[int]:
    """Vision patches of every sample (its images' together; each sample of a detection set has one),
    in the data set's order, from the files' headers."""
    count = patch_counter(processor)
    return [sum(count(image) for image in images or []) for images in dataset["images"]]


def patch_counter(processor) -> Callable[[object], int]:
    """A function giving the vision patches of one image (a path or a PIL image) as this processor
    resizes it: its pixel limits, patch size and merge size (16 and 2 in the Qwen3 families)."""
    from src.planning.pixels import image_grid, limits_of_processor

    low, high = limits_of_processor(processor)
    patch = getattr(processor.image_processor, "patch_size", 14)
    merge = getattr(processor.image_processor, "merge_size", 2)
    return lambda image: image_grid(*image_size(image), low, high, patch, merge)[0]


def image_size(image) -> tuple[int, int]:
    """(width, height) of a path's image, from its header, or of a PIL image."""
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as opened:
            return opened.size
    return image.size
