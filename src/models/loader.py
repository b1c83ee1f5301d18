"""Load a Qwen2-VL / Qwen2.5-VL model and its processor: bf16/fp32, or 4-bit nf4 (QLoRA).

The vision tower and `lm_head` are never quantized: the tower is small next to the LLM and
its LoRA needs full-precision activations. `load_quantized_model()` keeps the user's plan's name.
"""

from __future__ import annotations

import json
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# transformers 5 names the tower `model.visual`; the bare "visual" no longer matches (facts.md).
NOT_QUANTIZED = ["model.visual", "lm_head"]


def model_family(model_id: str) -> str:
    """'qwen2_vl' or 'qwen2_5_vl' from the model's config; ValueError for anything else."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model_id).model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{model_id} is a {model_type!r} model; recipe-runner supports Qwen2-VL and Qwen2.5-VL"
        )
    return model_type


def local_model_problem(model_id: str) -> str | None:
    """Why a local model path cannot be used (None when fine, or when it is a hub id)."""
    path = Path(model_id)
    looks_local = path.is_absolute() or model_id.startswith(".") or path.exists()
    if not looks_local:
        return None
    config = path / "config.json"
    if not config.is_file():
        return f"--model-id {model_id}: no config.json there; pass a model directory or a hub id"
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"--model-id {model_id}: model_type {model_type!r} is not Qwen2-VL or Qwen2.5-VL"
    return None


def compute_dtype(device: str):
    """bf16 on GPUs that have it, fp32 on the CPU (bf16 matmuls there are slow and lossy)."""
    import torch

    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def device_map_for(device: str):
    # "auto" spreads one model over every visible GPU: that is how `--gpu 0,1` shards.
    return "auto" if device == "cuda" else {"": "cpu"}


def load_processor(model_id: str):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_id)
    processor.tokenizer.padding_side = "right"  # training pads right; generation switches to left
    return processor


def load_model(model_id: str, device: str = "cpu", attn_implementation: str = "sdpa"):
    """The full-precision model (bf16 on GPU, fp32 on CPU)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        model_id,
        dtype=compute_dtype(device),
        device_map=device_map_for(device),
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
        device_map=device_map_for(device),
        attn_implementation=attn_implementation,
    )
    if device == "cpu":
        _disable_avx512_bf16_repack(model)
    return model


def _disable_avx512_bf16_repack(model) -> None:
    # On CPUs with avx512_bf16 a no-grad forward repacks 4-bit weights and later training
    # fails (facts.md); turning the path off on every 4-bit layer avoids it.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def count_quantized_layers(model) -> dict[str, int]:
    """4-bit layers per model part; a quick check that the vision tower stayed full precision."""
    import bitsandbytes as bnb

    from src.models.freeze import part_of

    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            counts[part_of(name)] = counts.get(part_of(name), 0) + 1
    return counts
