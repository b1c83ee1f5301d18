"""ModelShape and the parameter counts, per part, against transformers' own models of each family: built
from the config on the meta device (no memory, no weights) and counted by src/contract/families.py's
part_of, the same paths the freeze policy and LoRA scoping use."""

from __future__ import annotations

import collections

import pytest

from src.planning.parameters import (
    LINEAR_ATTENTION,
    ModelShape,
    llm_layer_counts,
    parameter_counts,
    part_parameter_counts,
)
from src.planning.shapes import QWEN3_VL_8B_CONFIG, SHAPES, VISION

QWEN3_VL_8B_PARAMETERS = 8_767_123_696  # Qwen3-VL-8B-Instruct's published size: 8.77B


def real_counts(config) -> dict[str, int]:
    """Parameters per part of transformers' model for `config`, built on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    from src.contract.families import part_of

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    counts: collections.Counter = collections.Counter()
    for name, parameter in model.named_parameters():
        counts[part_of(name)] += parameter.numel()
    return dict(counts)


def qwen2_vl(name: str):
    from transformers import Qwen2VLConfig

    text = SHAPES[name]
    vision = {**VISION, "hidden_size": text["hidden_size"]}  # the merger's output: the LLM's width
    tied = text["tie_word_embeddings"]
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)


def qwen2_5_vl_7b():
    from transformers import Qwen2_5_VLConfig

    vision = {"hidden_size": 1280, "intermediate_size": 3420, "out_hidden_size": 3584, "depth": 32}
    return Qwen2_5_VLConfig(text_config=SHAPES["7b"], vision_config=vision)


def qwen3_vl_8b():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(**QWEN3_VL_8B_CONFIG)


def qwen3_5_defaults():
    from transformers import Qwen3_5Config

    return Qwen3_5Config()


def qwen3_vl_odd():
    """heads x head_dim (8 x 48) wider than the hidden width (256), attention biases, one DeepStack tap."""
    from transformers import Qwen3VLConfig

    text = {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 48,
        "attention_bias": True,
        "vocab_size": 1000,
    }
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 100, "num_heads": 4, "out_hidden_size": 200}
    return Qwen3VLConfig(text_config=text, vision_config={**vision, "deepstack_visual_indexes": [0]})


def qwen3_5_odd():
    """Layer kinds in an order of their own, more value heads than key heads, biases, tied embeddings."""
    from transformers import Qwen3_5Config

    text = {
        "hidden_size": 128,
        "intermediate_size": 320,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 40,
        "attention_bias": True,
        "vocab_size": 700,
        "layer_types": ["full_attention"] + ["linear_attention"] * 2 + ["full_attention"] * 2,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 6,
        "linear_key_head_dim": 24,
        "linear_value_head_dim": 20,
        "linear_conv_kernel_dim": 3,
    }
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 96, "num_heads": 4, "out_hidden_size": 128}
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True)


CONFIGS = {
    "qwen2-vl-2b": lambda: qwen2_vl("2b"),
    "qwen2-vl-7b": lambda: qwen2_vl("7b"),
    "qwen2.5-vl-7b": qwen2_5_vl_7b,
    "qwen3-vl-8b": qwen3_vl_8b,
    "qwen3.5-defaults": qwen3_5_defaults,
    "qwen3-vl-odd": qwen3_vl_odd,
    "qwen3.5-odd": qwen3_5_odd,
}


@pytest.mark.parametrize("name", CONFIGS)
def test_parameters_per_part_are_those_of_transformers_model(name):
    config = CONFIGS[name]()
    planned = part_parameter_counts(ModelShape.from_config(config.to_dict()))
    real = real_counts(config)
    assert set(planned) == set(real)
    for part, count in real.items():
        assert planned[part] == pytest.approx(count, rel=0.005), part


def test_the_published_qwen3_vl_8b_config_as_the_hub_has_it():
    """QWEN3_VL_8B_CONFIG is the hub's config.json (nested text and vision configs, rope in rope_scaling)."""
    shape = ModelShape.from_config(QWEN3_VL_8B_CONFIG)
    assert sum(part_parameter_counts(shape).values()) == QWEN3_VL_8B_PARAMETERS
    assert (shape.family, shape.head_dim, shape.q_dim, shape.kv_dim) == ("qwen3_vl", 128, 4096, 1024)
    assert (shape.patch_size, shape.merge_size, shape.vision_embed) == (16, 2, 1152)
    assert (shape.vision_intermediate, shape.vision_positions, shape.merger_out) == (4304, 2304, 4096)
    assert (shape.deepstack_mergers, shape.mergers) == (3, 4)  # the merger and three DeepStack mergers
    assert (shape.vocab, shape.tied_embeddings, shape.attention_bias) == (151936, False, False)
    assert shape.qk_norm and shape.linear_attention is None and not shape.attention_gate
    # 4-bit: the decoder layers' linears, 36 x (q, k, v, o and the MLP)
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288
    assert parameter_counts(shape)["llm_linear"] == 36 * layer


def test_a_flat_config_and_rope_parameters_read_as_the_nested_one():
    text = {k: v for k, v in QWEN3_VL_8B_CONFIG["text_config"].items() if k != "model_type"}
    flat = {**{k: v for k, v in QWEN3_VL_8B_CONFIG.items() if k != "text_config"}, **text}
    flat["rope_parameters"] = flat.pop("rope_scaling")
    assert ModelShape.from_config(flat) == ModelShape.from_config(QWEN3_VL_8B_CONFIG)


def test_the_hybrid_layers_of_qwen3_5():
    shape = ModelShape.from_config(qwen3_5_defaults().to_dict())
    assert (shape.family, shape.vocab, shape.head_dim, shape.q_dim) == ("qwen3_5", 248320, 256, 4096)
    assert shape.rotary_dim == 64  # a quarter of each head
    assert llm_layer_counts(shape) == {"full_attention": 8, LINEAR_ATTENTION: 24}  # every fourth attends
    delta = shape.linear_attention
    assert delta is not None and (delta.key_dim, delta.value_dim, delta.conv_dim) == (2048, 4096, 8192)
    assert shape.deepstack_mergers == 0 and shape.attention_gate and shape.merger_out == 3584
    # without layer_types config.json still says which layers attend: transformers' default interval of 4
    bare = {"model_type": "qwen3_5", "text_config": {**qwen3_5_defaults().to_dict()["text_config"]}}
    del bare["text_config"]["layer_types"]
    assert llm_layer_counts(ModelShape.from_config(bare)) == llm_layer_counts(shape)
    odd = ModelShape.from_config(qwen3_5_odd().to_dict())
    assert llm_layer_counts(odd) == {"full_attention": 3, LINEAR_ATTENTION: 2}
