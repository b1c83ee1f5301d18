"""The model families and their parts by module path: what the freeze policy, the LoRA targets, the
memory planner and the input checks agree on. Torch-free.

Paths (transformers 5; PEFT prefixes every name with `base_model.model.`):
  vision tower     model.visual.blocks.N.attn.qkv.weight                 part "vision"
  patch embed      model.visual.patch_embed.proj.weight                  part "patch_embed" (never trains)
  position embed   model.visual.pos_embed.weight (Qwen3-VL, Qwen3.5)     part "patch_embed" (never trains)
  merger           model.visual.merger.mlp.0.weight (Qwen2-VL, 2.5-VL)   part "merger"
                   model.visual.merger.linear_fc1.weight (Qwen3-VL, 3.5)
  DeepStack        model.visual.deepstack_merger_list.N.linear_fc1...    part "merger" (Qwen3-VL)
  LLM              model.language_model.layers.N.self_attn...           part "llm"
                   model.language_model.layers.N.linear_attn... (Qwen3.5's Gated DeltaNet layers)

Qwen3-VL's DeepStack mergers count as the merger, not the tower: each is a copy of the merger (norm, two
linears) that projects one vision layer's features into the LLM's first layers, which is the merger's job;
so a recipe that trains the merger trains them, one that freezes it freezes them, and "vision-only" (r2)
changes every path from image to LLM, not one of four. Counting them as the tower (as one tool's freeze flag
did) trains them in r2 only through the tower's setting and leaves "train_merger" meaning a quarter of it.
The user's plan had the bug `"model.layers" in name`, which never matches `model.language_model.layers`;
parts are therefore found by anchored patterns. LoRA targets are regexes anchored on the part's path
(`visual.blocks.N.`, `visual.merger.`, `language_model.layers.N.`), which PEFT full-matches against
module names: bare names are not enough, since `"proj"` also hits the Conv3d patch embedding (which LoRA
cannot wrap) and Qwen2.5-VL's vision MLP reuses the LLM's `gate_proj/up_proj/down_proj`.
"""

from __future__ import annotations

import re

LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Qwen3.5's Gated DeltaNet layers: their projections in and out (in_proj_a/_b map to one value a head).
LINEAR_ATTENTION_LORA_TARGETS = ("in_proj_qkv", "in_proj_z", "out_proj")

# Vision-block linear layers per family (the plan's VISION_LORA_TARGETS is the qwen2_vl row).
VISION_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("qkv", "proj", "fc1", "fc2"),
    "qwen2_5_vl": ("qkv", "proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3_vl": ("qkv", "proj", "linear_fc1", "linear_fc2"),
    "qwen3_5": ("qkv", "proj", "linear_fc1", "linear_fc2"),
}

# The merger's linears: merger.mlp.0 and .2 (mlp.1 is the GELU), or merger.linear_fc1 and _fc2.
MERGER_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("0", "2"),
    "qwen2_5_vl": ("0", "2"),
    "qwen3_vl": ("linear_fc1", "linear_fc2"),
    "qwen3_5": ("linear_fc1", "linear_fc2"),
}

LLM_TARGETS: dict[str, tuple[str, ...]] = {
    "qwen2_vl": LLM_LORA_TARGETS,
    "qwen2_5_vl": LLM_LORA_TARGETS,
    "qwen3_vl": LLM_LORA_TARGETS,
    "qwen3_5": LLM_LORA_TARGETS + LINEAR_ATTENTION_LORA_TARGETS,
}

# Where each part's LoRA targets sit; the module name that follows is one of the part's targets.
PART_PATHS = {
    "vision": r"visual\.blocks\.\d+\.(?:attn|mlp)",
    "merger": r"visual\.(?:merger|merger\.mlp|deepstack_merger_list\.\d+)",
    "llm": r"language_model\.layers\.\d+\.(?:self_attn|linear_attn|mlp)",
}


FAMILIES = tuple(VISION_LORA_TARGETS)  # the model_type values of config.json we train
FAMILY_NAMES = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "qwen3_5": "Qwen3.5",
}
# Families transformers has that we refuse, and why (checked before anything starts: exit 2).
REFUSED_FAMILIES = {
    "qwen3_vl_moe": "Qwen3-VL MoE keeps its experts in fused parameters that LoRA on linear layers cannot "
    "reach and the memory planner does not model",
    "qwen3_5_moe": "Qwen3.5 MoE keeps its experts in fused parameters that LoRA on linear layers cannot "
    "reach and the memory planner does not model",
}


def supported_names() -> str:
    """'Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense) and Qwen3.5 (dense)': for messages that refuse a model."""
    names = [FAMILY_NAMES[f] + (" (dense)" if f.startswith("qwen3") else "") for f in FAMILIES]
    return ", ".join(names[:-1]) + " and " + names[-1]


def family_problem(model_type: str | None) -> str | None:
    """Why a config.json's model_type cannot be trained (None when it can)."""
    if model_type in FAMILIES:
        return None
    why = REFUSED_FAMILIES.get(str(model_type))
    supported = f"recipe-runner trains {supported_names()}"
    if why:
        return f"model_type {model_type!r} is not supported: {why}; {supported}"
    return f"model_type {model_type!r} is not a model recipe-runner trains; {supported}"


PART_TARGETS = {"vision": VISION_LORA_TARGETS, "merger": MERGER_LORA_TARGETS, "llm": LLM_TARGETS}


def default_targets(part: str, family: str) -> tuple[str, ...]:
    """The linear layers LoRA targets in one part of one family when the recipe names none."""
    return PART_TARGETS[part][family]


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
    ("patch_embed", re.compile(r"(?:^|\.)visual\.(?:patch_embed|pos_embed)\.")),
    ("merger", re.compile(r"(?:^|\.)visual\.(?:merger|deepstack_merger_list)\.")),
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
