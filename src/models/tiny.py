"""A tiny random Qwen2-VL built offline: tokenizer, processor, chat template and model.

Nothing is downloaded: the BPE tokenizer is trained here on a small synthetic corpus with
Qwen2's pre-tokenizer and Qwen2-VL's special tokens, the chat template is Qwen2-VL's (TRL
ships it), and the model is built from a config with the real architecture at toy sizes.
Tests and the demo use it; `python -m src.fixtures` writes it to disk.
"""

from __future__ import annotations

from pathlib import Path

# Qwen2-VL's special tokens, in the order of their real ids (151643...).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2's pre-tokenizer: digits stay single, so coordinates tokenise digit by digit.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Small images keep the tiny model fast: at most 16 merged image tokens (112 x 112 px).
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


def _corpus(extra_words: tuple[str, ...]) -> list[str]:
    """Text the tokenizer learns from: chat scaffolding, prompts, labels and numbers."""
    words = (
        "system user assistant You are a helpful assistant. Detect every object in the image "
        "and give its label and bounding box. Find all objects. none red green blue yellow "
        "purple orange white black circle square triangle star ring cross diamond shape the of "
        "and a an with on in image picture box label object"
    ).split()
    lines = [" ".join(words), *extra_words]
    lines += [f"({x},{y}),({x + 7},{y + 3})" for x in range(0, 1000, 37) for y in range(0, 1000, 111)]
    return lines * 3


def build_tokenizer(extra_words: tuple[str, ...] = (), vocab_size: int = 600):
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens, as a Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_corpus(extra_words), trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(pair.split(" ")) if isinstance(pair, str) else tuple(pair) for pair in _merges(bpe)]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


def _merges(bpe) -> list:
    import json

    return json.loads(bpe.to_str())["model"]["merges"]


def build_processor(tokenizer):
    """Qwen2-VL's processor around the tiny tokenizer, with Qwen2-VL's chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from trl.chat_template_utils import qwen2_5_vl_chat_template  # byte-identical to Qwen2-VL's

    size = {"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS}
    tokenizer.chat_template = qwen2_5_vl_chat_template
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=qwen2_5_vl_chat_template,
    )


def build_config(tokenizer, hidden: int = 64, layers: int = 2, vision_depth: int = 2):
    """Qwen2-VL's architecture at toy size; special ids taken from the tokenizer."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden // heads
    half = head_dim // 2
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        # M-RoPE splits head_dim/2 over (time, height, width).
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": vision_depth,
        "embed_dim": 32,
        "hidden_size": hidden,
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_model(out_dir: str | Path, extra_words: tuple[str, ...] = (), seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL (weights, config, processor) to `out_dir`."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(extra_words)
    processor = build_processor(tokenizer)
    model = Qwen2VLForConditionalGeneration(build_config(tokenizer))
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
