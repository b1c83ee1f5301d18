"""LoRA configs whose targets are scoped by module path, so a recipe wraps only its own parts.

Bare names are not enough: `"proj"` also hits the Conv3d patch embedding (which LoRA cannot
wrap), and Qwen2.5-VL's vision MLP reuses the LLM's `gate_proj/up_proj/down_proj`. Every target
is therefore a regex anchored on the part's path (`visual.blocks.N.`, `visual.merger.`,
`language_model.layers.N.`), which PEFT full-matches against module names.
"""

from __future__ import annotations

import re

LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Vision-block linear layers per family (the plan's VISION_LORA_TARGETS is the qwen2_vl row).
VISION_LORA_TARGETS = {
    "qwen2_vl": ("qkv", "proj", "fc1", "fc2"),
    "qwen2_5_vl": ("qkv", "proj", "gate_proj", "up_proj", "down_proj"),
}
MERGER_LORA_TARGETS = ("0", "2")  # merger.mlp.0 and merger.mlp.2 (mlp.1 is the GELU)
PART_PATHS = {
    "vision": r"visual\.blocks\.\d+\.(?:attn|mlp)",
    "merger": r"visual\.merger\.mlp",
    "llm": r"language_model\.layers\.\d+\.(?:self_attn|mlp)",
}
FAMILIES = tuple(VISION_LORA_TARGETS)


def default_targets(part: str, family: str) -> tuple[str, ...]:
    return {"vision": VISION_LORA_TARGETS[family], "merger": MERGER_LORA_TARGETS, "llm": LLM_LORA_TARGETS}[
        part
    ]


def target_regex(parts: set[str], family: str, names: tuple[str, ...] | None = None) -> str:
    """One regex matching exactly the named linear layers inside the given parts."""
    if family not in FAMILIES:
        raise ValueError(f"unsupported model family {family!r}; expected one of {FAMILIES}")
    alternatives = []
    for part in sorted(parts):
        part_names = names if names is not None else default_targets(part, family)
        joined = "|".join(re.escape(n) for n in part_names)
        alternatives.append(rf"(?:.*\.)?{PART_PATHS[part]}\.(?:{joined})")
    return "|".join(f"(?:{alt})" for alt in alternatives)


def create_lora_config(recipe, family: str = "qwen2_vl"):
    """A peft.LoraConfig for `recipe`'s trained parts on a model of `family`."""
    from peft import LoraConfig

    from src.models.freeze import trained_parts

    return LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=target_regex(trained_parts(recipe), family, recipe.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
