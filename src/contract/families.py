"""The model families and their parts by module path: what the freeze policy, the LoRA targets, the
memory planner and the input checks agree on. Torch-free.

Paths (transformers 5; PEFT prefixes every name with `base_model.model.`):
  vision tower   model.visual.blocks.N.attn.qkv.weight        part "vision"
  patch embed    model.visual.patch_embed.proj.weight         part "patch_embed" (never trains)
  merger         model.visual.merger.mlp.0.weight             part "merger"
  LLM            model.language_model.layers.N.self_attn...  part "llm"
The user's plan had the bug `"model.layers" in name`, which never matches `model.language_model.layers`;
parts are therefore found by anchored patterns. LoRA targets are regexes anchored on the part's path
(`visual.blocks.N.`, `visual.merger.`, `language_model.layers.N.`), which PEFT full-matches against
module names: bare names are not enough, since `"proj"` also hits the Conv3d patch embedding (which LoRA
cannot wrap) and Qwen2.5-VL's vision MLP reuses the LLM's `gate_proj/up_proj/down_proj`.
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


FAMILIES = tuple(VISION_LORA_TARGETS)  # the model_type values of config.json we train


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


PART_PATTERNS = (
    ("patch_embed", re.compile(r"(?:^|\.)visual\.patch_embed\.")),
    ("merger", re.compile(r"(?:^|\.)visual\.merger\.")),
    ("vision", re.compile(r"(?:^|\.)visual\.")),
    ("llm", re.compile(r"(?:^|\.)language_model\.")),
    ("lm_head", re.compile(r"(?:^|\.)lm_head\.")),
)


def part_of(name: str) -> str:
    """The model part a parameter or module path belongs to ('other' when none)."""
    for part, pattern in PART_PATTERNS:
        if pattern.search(name + "."):
            return part
    return "other"


FULL_COPY = ".modules_to_save."  # in the name of every parameter of a fully trained part's copy


def trained_parts(recipe) -> set[str]:
    """Parts the recipe trains, by LoRA or fully."""
    return set(recipe.modes())


def lora_parts(recipe) -> set[str]:
    return {part for part, mode in recipe.modes().items() if mode == "lora"}


def full_parts(recipe) -> set[str]:
    return {part for part, mode in recipe.modes().items() if mode == "full"}


def vision_trains(recipe) -> bool:
    """Whether anything in the vision tower (blocks or merger) trains, so gradients must reach it."""
    return bool(trained_parts(recipe) & {"vision", "merger"})
