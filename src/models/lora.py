"""LoRA configs whose targets are scoped by module path, so a recipe wraps only its own parts.

Bare names are not enough: `"proj"` also hits the Conv3d patch embedding (which LoRA cannot
wrap), and Qwen2.5-VL's vision MLP reuses the LLM's `gate_proj/up_proj/down_proj`. Every target
is therefore a regex anchored on the part's path (`visual.blocks.N.`, `visual.merger.`,
`language_model.layers.N.`), which PEFT full-matches against module names.

A part trained "full" goes to PEFT's `modules_to_save`: PEFT trains a copy of the module and saves it
with the adapter, so `save_pretrained`, `merge_and_unload` (chained stages, export) carry it along.
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


# PEFT matches modules_to_save entries by the end of a module's path; these end one module each.
FULL_MODULES = {"merger": ("visual.merger",), "lm_head": ("lm_head",)}
VISION_BLOCK = re.compile(r"(?:^|\.)(visual\.blocks\.\d+)$")


def full_module_names(recipe, model) -> list[str]:
    """What PEFT's modules_to_save copies and trains for the recipe's "full" parts, found in `model`."""
    from src.models.freeze import full_parts

    parts = full_parts(recipe)
    names = [name for part in sorted(parts - {"vision"}) for name in FULL_MODULES[part]]
    if "vision" in parts:  # each block on its own: the tower iterates its ModuleList of blocks
        names += [m.group(1) for key, _ in model.named_modules() if (m := VISION_BLOCK.search(key))]
    if "lm_head" in parts and tied_embeddings(model):
        raise ValueError(
            f"recipe {recipe.name}: train_lm_head = 'full' on a model that ties lm_head to embed_tokens "
            "(tie_word_embeddings, e.g. Qwen2-VL-2B): the trained copy would untie them and be lost on "
            "merge; keep train_lm_head = 'frozen' or use a model with untied embeddings (e.g. 7B)"
        )
    return names


def tied_embeddings(model) -> bool:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def create_lora_config(recipe, family: str = "qwen2_vl", model=None):
    """A peft.LoraConfig for `recipe`'s LoRA parts on a model of `family`, its full parts as modules_to_save.

    `model` (the unwrapped base) is needed only when the recipe trains a part "full".
    """
    from peft import LoraConfig

    from src.models.freeze import full_parts, lora_parts

    if full_parts(recipe) and model is None:
        raise ValueError(f"recipe {recipe.name} trains a part fully: pass the model to create_lora_config")
    full = full_module_names(recipe, model) if model is not None else []
    return LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=target_regex(lora_parts(recipe), family, recipe.lora_target_modules),
        modules_to_save=full or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
