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
        patches = max(patches, sum(count(*image_size(image)) for image in row.get("images") or []))
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        text_tokens = max(text_tokens, len(processor.tokenizer(text)["input_ids"]))
    return patches, text_tokens


def image_patches(dataset, processor, sizes: list[list[tuple[int, int]]] | None = None) -> list[int]:
    """Vision patches of every sample (its images' together; each sample of a detection set has one),
    in the data set's order, from `sizes` (sample_image_sizes) or the files' headers."""
    count = patch_counter(processor)
    sizes = sample_image_sizes(dataset) if sizes is None else sizes
    return [sum(count(width, height) for width, height in sample) for sample in sizes]


def sample_image_sizes(dataset) -> list[list[tuple[int, int]]]:
    """(width, height) of each sample's images, in the data set's order, from the files' headers."""
    return [[image_size(image) for image in images or []] for images in dataset["images"]]


def patch_counter(processor) -> Callable[[int, int], int]:
    """A function giving the vision patches of an image of (width, height) as this processor resizes it:
    its pixel limits, patch size and merge size (16 and 2 in the Qwen3 families)."""
    from src.planning.pixels import geometry_of_processor, image_grid, limits_of_processor

    low, high = limits_of_processor(processor)
    patch, merge = geometry_of_processor(processor)
    return lambda width, height: image_grid(width, height, low, high, patch, merge)[0]


def image_size(image) -> tuple[int, int]:
    """(width, height) of a path's image, from its header, or of a PIL image."""
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as opened:
            return opened.size
    return image.size
