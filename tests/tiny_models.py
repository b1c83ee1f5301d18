"""Random Qwen3-VL and Qwen3.5 models at toy size, built in memory from the fixtures' configs
(src/fixtures/tiny_qwen3.py; no files written): for tests of the parts, targets and vision attention of
the newer families."""


def tiny_qwen3_vl():
    """A random Qwen3-VL (patch 16, learned pos_embed, DeepStack at two vision layers), in memory."""
    from transformers import Qwen3VLForConditionalGeneration

    from src.fixtures.tiny_qwen3 import build_qwen3_tokenizer, qwen3_vl_config

    return Qwen3VLForConditionalGeneration(qwen3_vl_config(build_qwen3_tokenizer()))


def tiny_qwen3_5():
    """A random Qwen3.5 (Qwen3-VL's tower without DeepStack; three Gated DeltaNet layers, then attention)."""
    from transformers import Qwen3_5ForConditionalGeneration

    from src.fixtures.tiny_qwen3 import build_qwen3_tokenizer, qwen3_5_config

    return Qwen3_5ForConditionalGeneration(qwen3_5_config(build_qwen3_tokenizer()))
