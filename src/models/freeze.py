"""Which parameters of Qwen2-VL train: parameter paths -> model parts -> requires_grad.

Paths (transformers 5; PEFT prefixes every name with `base_model.model.`):
  vision tower   model.visual.blocks.N.attn.qkv.weight        part "vision"
  patch embed    model.visual.patch_embed.proj.weight         part "patch_embed" (never trains)
  merger         model.visual.merger.mlp.0.weight             part "merger"
  LLM            model.language_model.layers.N.self_attn...  part "llm"
The user's plan had the bug `"model.layers" in name`, which never matches
`model.language_model.layers`; parts are therefore found by these anchored patterns.
A part a recipe trains "full" is a PEFT `modules_to_save` copy: its trainable parameters sit under
`<module>.modules_to_save.default.`, the frozen original under `<module>.original_module.`.
"""

from __future__ import annotations

from collections import Counter

from src.contract.families import FULL_COPY, full_parts, lora_parts, part_of, vision_trains


def apply_freeze_policy(model, recipe) -> Counter:
    """Freeze everything but the LoRA weights of the recipe's LoRA parts and the copies of its full parts.

    Returns trainable parameter counts per part, so callers can log and check them.
    Runs after PEFT wrapping: LoRA tensors and modules_to_save copies are the only ones that may train.
    """
    lora, full = lora_parts(recipe), full_parts(recipe)
    trainable: Counter = Counter()
    for name, param in model.named_parameters():
        part = part_of(name)
        param.requires_grad_(("lora_" in name and part in lora) or (FULL_COPY in name and part in full))
        if param.requires_grad:
            trainable[part] += param.numel()
    missing = (lora | full) - set(trainable)
    if missing:
        raise ValueError(
            f"recipe {recipe.name} trains {sorted(missing)} but no LoRA weights or full-training copies "
            "were found there"
        )
    return trainable


def keep_frozen_vision_out_of_autograd(model, recipe) -> bool:
    """Run the vision tower under no_grad when nothing in it (or the merger) trains.

    Without this, the trainer's `enable_input_require_grads` marks the patch embedding's output as
    requiring grad, so a frozen tower records its whole graph and the backward pass walks all of
    its blocks for gradients nobody uses (r1, r3's stage 2). Returns whether it was applied.
    """
    import torch

    if vision_trains(recipe):
        return False
    tower = vision_tower(model)
    tower.forward = torch.no_grad()(tower.forward)
    return True


def vision_tower(model):
    """The `visual` module of a (possibly PEFT-wrapped) Qwen2-VL model."""
    for name, module in model.named_modules():
        if name.endswith("visual") and part_of(name) == "vision":
            return module
    raise ValueError("no vision tower (a module named 'visual') in this model")
