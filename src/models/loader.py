"""Load a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 model and its processor: bf16/fp32, or 4-bit nf4 (QLoRA).

The vision tower and `lm_head` are never quantized: the tower is small next to the LLM and
its LoRA needs full-precision activations. `load_quantized_model()` keeps the user's plan's name.
"""

from __future__ import annotations

from src.contract.families import family_problem

# transformers 5 names the tower `model.visual`; the bare "visual" no longer matches (docs/stack.md).
NOT_QUANTIZED = ["model.visual", "lm_head"]


def model_family(model_id: str) -> str:
    """The model's family (a `FAMILIES` value) from its config; ValueError for anything else."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model_id).model_type
    problem = family_problem(model_type)
    if problem:
        raise ValueError(f"{model_id}: {problem}")
    return model_type


def compute_dtype(device: str):
    """bf16 on GPUs that have it, fp32 on the CPU (bf16 matmuls there are slow and lossy)."""
    import torch

    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def device_map_for(device: str, model_id: str | None = None):
    """Where each module goes: one device, or (several visible GPUs, one process) a balanced split.

    Under data parallelism every rank sees all N GPUs but holds a whole model on its own one
    (`resolve_device` made it the current device). Sharded over several GPUs, `lm_head` is pinned to
    GPU 0 beside the embeddings: the trainer puts inputs and label counts there, and TRL's loss
    divides one by the other (seen failing on 4x H200 with lm_head on GPU 1: "found at least two
    devices, cuda:1 and cuda:0").
    """
    if device != "cuda":
        return {"": "cpu"}
    import torch

    from src.utils.gpu import world_size

    if world_size() > 1:
        return {"": torch.cuda.current_device()}
    if torch.cuda.device_count() < 2 or model_id is None:
        return {"": 0}
    return _balanced_map_with_head_on_first_gpu(model_id)


def _balanced_map_with_head_on_first_gpu(model_id: str) -> dict:
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig, AutoModelForImageTextToText

    with init_empty_weights():
        skeleton = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_id))
    no_split = skeleton._no_split_modules
    memory = get_balanced_memory(skeleton, dtype=torch.bfloat16, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(
        skeleton, max_memory=memory, no_split_module_classes=no_split, dtype=torch.bfloat16
    )
    device_map["lm_head"] = 0
    return device_map


def load_processor(
    model_id: str, min_pixels: int | None = None, max_pixels: int | None = None, cap: bool = True
):
    """The model's processor, resizing images to `src.planning.pixels.pixel_limits` (the run's --min-pixels
    and --max-pixels, else the processor's own with its maximum capped at 1280 image tokens). `cap=False`
    keeps a processor's own limits: one saved beside an adapter already holds what training used."""
    from transformers import AutoProcessor

    from src.planning.pixels import factor_of_processor, limits_of_processor, pixel_limits

    processor = AutoProcessor.from_pretrained(model_id)
    own = limits_of_processor(processor)
    factor = factor_of_processor(processor)  # 28 for Qwen2-VL and Qwen2.5-VL, 32 for the Qwen3 families
    wanted = (
        pixel_limits(own, min_pixels, max_pixels, factor)
        if cap
        else (min_pixels or own[0], max_pixels or own[1])
    )
    if wanted != own:  # the processor's own keyword arguments: its size dict follows them
        processor = AutoProcessor.from_pretrained(model_id, min_pixels=wanted[0], max_pixels=wanted[1])
    processor.tokenizer.padding_side = "right"  # training pads right; generation switches to left
    return processor


def load_model(model_id: str, device: str = "cpu", attn_implementation: str = "sdpa"):
    """The full-precision model (bf16 on GPU, fp32 on CPU)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        model_id,
        dtype=compute_dtype(device),
        device_map=device_map_for(device, model_id),
        attn_implementation=attn_implementation,
    )


def load_quantized_model(model_id: str, device: str = "cpu", attn_implementation: str = "sdpa"):
    """The LLM in 4-bit nf4 with double quantization; vision tower and lm_head in full precision."""
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(device),
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=NOT_QUANTIZED,
    )
    model = AutoModelForImageTextToText.from_pretrained(
        model_id,
        quantization_config=quantization,
        dtype=compute_dtype(device),
        device_map=device_map_for(device, model_id),
        attn_implementation=attn_implementation,
    )
    if device == "cpu":
        _disable_avx512_bf16_repack(model)
    return model


def _disable_avx512_bf16_repack(model) -> None:
    # On CPUs with avx512_bf16 a no-grad forward repacks 4-bit weights and later training
    # fails (docs/stack.md); turning the path off on every 4-bit layer avoids it.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def count_quantized_layers(model) -> dict[str, int]:
    """4-bit layers per model part; a quick check that the vision tower stayed full precision."""
    import bitsandbytes as bnb

    from src.contract.families import part_of

    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            counts[part_of(name)] = counts.get(part_of(name), 0) + 1
    return counts
