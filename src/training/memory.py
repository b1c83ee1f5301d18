"""What the memory planner (`src/planner.py`) needs to know at training time: the largest sample and
the GPU memory this process can use. Used by `run.resolve_checkpointing` and the worker's
`--batch-size auto`.
"""

from __future__ import annotations

SAMPLES_TO_SIZE = 64  # enough to find the largest image of a data set of one resolution or a few


def largest_sample(dataset, processor, limit: int = SAMPLES_TO_SIZE) -> tuple[int, int]:
    """(image patches, text tokens) of the largest of the first `limit` samples.

    Image sizes come from the files' headers (PIL opens lazily); text tokens from the chat
    template, where each image is still one placeholder token.
    """
    from src.data.dataset import processor_pixel_limits
    from src.planner import image_grid

    low, high = processor_pixel_limits(processor)
    patches = text_tokens = 0
    for row in dataset.select(range(min(limit, len(dataset)))):
        sizes = [_image_size(image) for image in row.get("images") or []]
        patches = max(patches, sum(image_grid(w, h, low, high)[0] for w, h in sizes))
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        text_tokens = max(text_tokens, len(processor.tokenizer(text)["input_ids"]))
    return patches, text_tokens


def _image_size(image) -> tuple[int, int]:
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as opened:
            return opened.size
    return image.size


# Set by the launcher for a job packed beside others on one GPU: the MiB it reserved there (less the CUDA
# context). The worker stays inside it, so that its evaluation, say, never takes a neighbour's memory.
BUDGET_ENV = "RECIPE_RUNNER_GPU_BUDGET_MIB"


def available_gpu_bytes() -> int:
    """GPU memory this process may fill: what is free plus what its own allocator already holds, and no
    more than the launcher's reservation for it (BUDGET_ENV) when it shares the GPU."""
    import os

    import torch

    free, _total = torch.cuda.mem_get_info()
    usable = free + torch.cuda.memory_reserved()
    budget = os.environ.get(BUDGET_ENV)
    return min(usable, int(budget) * 2**20) if budget else usable


def unallocated_gpu_bytes() -> int:
    """What this process may still allocate: available_gpu_bytes less what its tensors hold now."""
    import torch

    return max(0, available_gpu_bytes() - torch.cuda.memory_allocated())
