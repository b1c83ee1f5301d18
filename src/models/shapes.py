"""Random-weight Qwen2-VL models of the published 2B and 7B shapes, for GPU benchmarks and fan-out runs.

Nothing is downloaded: the architecture comes from the published config values (docs/benchmarks.md
lists them), the weights are random, and the tokenizer/processor are the offline tiny ones with
Qwen's usual image sizes. Speed and memory depend on the shapes, not on the weights' values.

    python -m src.models.shapes --shape 7b --out /tmp/qwen2-vl-7b-random     # on a GPU machine
"""

from __future__ import annotations

import argparse
from pathlib import Path

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


def shape_config(shape: str, tokenizer):
    """The Qwen2VLConfig of a published shape, with the special ids of `tokenizer`."""
    from transformers import Qwen2VLConfig

    from src.models.tiny import SPECIAL_TOKENS

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(SHAPES[shape])
    tie = text.pop("tie_word_embeddings")
    head_dim = text["hidden_size"] // text["num_attention_heads"]  # 128 for both shapes
    half = head_dim // 2
    text.update(
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8],
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config={**VISION, "hidden_size": text["hidden_size"]},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )


def build_shape_model(shape: str, out_dir: str | Path, device: str = "cuda", seed: int = 0) -> Path:
    """Write a random bf16 model of `shape` with an offline processor to out_dir."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from src.models.tiny import build_processor, build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    for sub in (processor.image_processor, processor.video_processor):
        sub.size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    config = shape_config(shape, tokenizer)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.models.shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True, help="directory to write the model to")
    parser.add_argument("--device", default="cuda", help="where to initialise the weights (default: cuda)")
    args = parser.parse_args(argv)
    print(build_shape_model(args.shape, args.out, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
