"""A tiny random Qwen2-VL built offline: tokenizer, processor, chat template and model.

Nothing is downloaded: the BPE tokenizer is trained here on a small synthetic corpus with
Qwen2's pre-tokenizer and Qwen2-VL's special tokens, the chat template is Qwen2-VL's (TRL
ships it), and the model is built from a config with the real architecture at toy sizes.
Tests use the default size (fast, random weights); the demo's base is DETECTOR_SIZE, pretrained
from scratch on synthetic shapes by `src.models.pretrain`. `python -m src.fixtures` writes both.
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
# Small images keep the tiny model fast: at most 25 merged image tokens (140 x 140 px).
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 140 * 140


# The demo's detector: big enough to learn to find and name shapes in under 4 minutes on two CPU
# cores (about 1.2M parameters). Its M-RoPE matters more than its size: with Qwen2-VL's usual
# rope_theta (1e4; 1e6 for the real models) and a head_dim of 32, the height and width sections
# only get frequencies of 0.03 rad per position and less, so the grid of image tokens looks like one
# position and nothing learns where an object is. A low theta, and most rotary dims on height and
# width, give the LLM usable positions. Measured (1500 steps, 112 px, one seed), share of shapes
# boxed at IoU >= 0.5 whatever the label: theta 1e4 6%, theta 10 50%, theta 10 with mrope
# (2, 7, 7) 84%. Naming the shape is what needs the wider vision tower (96) and 1500 steps: source
# test precision over seeds 0-2 went from 78/53/88% (tower 64, 1200 steps) to 100/100/75%.
DETECTOR_SIZE = {
    "hidden": 128,
    "layers": 4,
    "vision_depth": 2,
    "vision_embed": 96,
    "rope_theta": 10.0,
    "mrope_section": (2, 7, 7),
}


def _corpus(extra_words: tuple[str, ...]) -> list[str]:
    """Text the tokenizer learns from: chat scaffolding, prompts, labels and numbers."""
    from src.data.synthetic import RGB, SHAPES

    # Every label the shapes data can have, so each is whole-word tokens; not just the domains' labels,
    # so that changing a domain's colours leaves the tokenizer (and the pretrained detector) as it is.
    labels = [f"{colour} {shape}" for colour in RGB for shape in SHAPES]
    words = (
        "system user assistant You are a helpful assistant. Detect every object in the image "
        "and give its label and bounding box. Find all objects. none red green blue yellow "
        "purple orange cyan white black circle square triangle star ring cross diamond shape the of "
        "and a an with on in image picture box label object"
    ).split()
    lines = [" ".join(words), *labels, *extra_words]
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


def build_config(
    tokenizer,
    hidden: int = 64,
    layers: int = 2,
    vision_depth: int = 2,
    vision_embed: int = 32,
    rope_theta: float = 10000.0,
    mrope_section: tuple[int, int, int] | None = None,
):
    """Qwen2-VL's architecture at toy size; special ids taken from the tokenizer.

    `mrope_section` splits head_dim/2 rotary frequencies over (time, height, width), highest
    frequencies first; None splits them about evenly, as the default tiny model always did.
    """
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden // heads
    half = head_dim // 2
    section = list(mrope_section or (half - 2 * (half // 3), half // 3, half // 3))
    if sum(section) != half:
        raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {half}")
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        # M-RoPE splits head_dim/2 over (time, height, width).
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": section},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": vision_depth,
        "embed_dim": vision_embed,
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


def build_tiny_model(out_dir: str | Path, extra_words: tuple[str, ...] = (), seed: int = 0, **size) -> Path:
    """Write a tiny random Qwen2-VL (weights, config, processor) to `out_dir`.

    `size` overrides build_config's defaults, e.g. `build_tiny_model(d, **DETECTOR_SIZE)`.
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(extra_words)
    processor = build_processor(tokenizer)
    model = Qwen2VLForConditionalGeneration(build_config(tokenizer, **size))
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
