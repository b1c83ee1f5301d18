"""The published Qwen2-VL 2B and 7B shapes, as config values (torch-free): what the planner's own CLI,
the benchmark and the random-weight models of src/fixtures/shapes.py are built from.
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
