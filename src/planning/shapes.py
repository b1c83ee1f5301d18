"""The published Qwen2-VL 2B and 7B and Qwen3-VL 8B shapes, as config values (torch-free): what the
planner's own CLI, the benchmark and the random-weight models of src/fixtures/shapes.py are built from;
`published_shape(name)` gives one as the planner sees it.
"""

from __future__ import annotations

VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


SHAPES = {
    "2b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
}


# Qwen's processor defaults: a 644x476 image becomes 391 merged image tokens.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280


# The published Qwen/Qwen3-VL-8B-Instruct config.json (the hub's layout: nested text and vision configs)
# and preprocessor_config.json; docs/stack.md lists where these values were checked.
QWEN3_VL_8B_CONFIG = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_vl_text",
        "attention_bias": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "max_position_embeddings": 262144,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        "rope_theta": 5000000,
        "vocab_size": 151936,
        "dtype": "bfloat16",
    },
    "vision_config": {
        "model_type": "qwen3_vl",
        "deepstack_visual_indexes": [8, 16, 24],
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "in_channels": 3,
        "intermediate_size": 4304,
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 4096,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}
QWEN3_VL_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


PUBLISHED_NAMES = ("2b", "7b", "qwen3-vl-8b")


def published_shape(name: str):
    """(ModelShape, (min, max) pixels) of a published model: its images capped as training caps them
    (1280 image tokens; Qwen2-VL's shapes keep Qwen's default limits)."""
    from src.planning.parameters import ModelShape
    from src.planning.pixels import (
        DEFAULT_MAX_PIXELS,
        DEFAULT_MIN_PIXELS,
        limits_of_preprocessor,
        pixel_limits,
    )

    if name == "qwen3-vl-8b":
        shape = ModelShape.from_config(QWEN3_VL_8B_CONFIG)
        factor = shape.patch_size * shape.merge_size
        return shape, pixel_limits(limits_of_preprocessor(QWEN3_VL_PREPROCESSOR), factor=factor)
    config = {**SHAPES[name], "model_type": "qwen2_vl", "vision_config": VISION}
    return ModelShape.from_config(config), (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
