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

from src.contract.families import target_regex

# PEFT matches modules_to_save entries by the end of a module's path; these end one module each.
FULL_MODULES = {"merger": ("visual.merger",), "lm_head": ("lm_head",)}
# Modules held in a ModuleList are copied one by one: the model indexes or iterates the list, which
# a copy of the whole list would hide behind PEFT's wrapper.
LISTED_MODULES = {
    "vision": re.compile(r"(?:^|\.)(visual\.blocks\.\d+)$"),
    "merger": re.compile(r"(?:^|\.)(visual\.deepstack_merger_list\.\d+)$"),  # Qwen3-VL's DeepStack
}


def full_module_names(recipe, model) -> list[str]:
    """What PEFT's modules_to_save copies and trains for the recipe's "full" parts, found in `model`."""
    from src.contract.families import full_parts

    parts = full_parts(recipe)
    names = [name for part in sorted(parts) for name in FULL_MODULES.get(part, ())]
    for part in sorted(parts & set(LISTED_MODULES)):
        names += [m.group(1) for key, _ in model.named_modules() if (m := LISTED_MODULES[part].search(key))]
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

    from src.contract.families import full_parts, lora_parts

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
