"""What the memory planner (`src/planning/memory.py`) needs to know of a data set at training time: its
largest sample. Used by `run.resolve_checkpointing` (with src/utils/gpu.py's available_gpu_bytes) and the
benchmark.
"""

from __future__ import annotations

SAMPLES_TO_SIZE = 64  # enough to find the largest image of a data set of one resolution or a few


def largest_sample(dataset, processor, limit: int = SAMPLES_TO_SIZE) -> tuple[int, int]:
    """(image patches, text tokens) of the largest of the first `limit` samples.

    Image sizes come from the files' headers (PIL opens lazily); text tokens from the chat
    template, where each image is still one placeholder token.
    """
    from src.planning.pixels import image_grid, limits_of_processor

    low, high = limits_of_processor(processor)
    patch = getattr(processor.image_processor, "patch_size", 14)  # 16 in the Qwen3 families
    merge = getattr(processor.image_processor, "merge_size", 2)
    patches = text_tokens = 0
    for row in dataset.select(range(min(limit, len(dataset)))):
        sizes = [_image_size(image) for image in row.get("images") or []]
        patches = max(patches, sum(image_grid(w, h, low, high, patch, merge)[0] for w, h in sizes))
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        text_tokens = max(text_tokens, len(processor.tokenizer(text)["input_ids"]))
    return patches, text_tokens


def _image_size(image) -> tuple[int, int]:
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as opened:
            return opened.size
    return image.size
