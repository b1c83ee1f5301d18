"""Freeze policy and LoRA targets: right by construction, for Qwen2-VL and Qwen2.5-VL."""

import re

import pytest

from src.contract.families import part_of, target_regex
from src.models.freeze import apply_freeze_policy
from src.models.lora import create_lora_config
from src.recipes import RECIPES
from tests.conftest import tiny_qwen2_5_vl
from tests.tiny_models import tiny_qwen3_5, tiny_qwen3_vl


def test_part_of_uses_transformers5_paths():
    assert part_of("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert part_of("model.visual.merger.mlp.0.weight") == "merger"
    assert part_of("model.visual.patch_embed.proj.weight") == "patch_embed"
    assert part_of("model.language_model.layers.0.self_attn.q_proj.weight") == "llm"
    assert (
        part_of("base_model.model.model.language_model.layers.3.mlp.up_proj.lora_B.default.weight") == "llm"
    )
    assert part_of("lm_head.weight") == "lm_head"


def test_plan_bug_regression_every_parameter_lands_in_its_part(tiny_model_dir):
    """The plan's freeze bug came from un-anchored name tests against the transformers 5 layout
    (`model.language_model.layers`, `model.visual.blocks`); every real parameter, bare or under
    PEFT's prefix, must land in exactly the part its path says, and none in 'other'."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("model.layers") for n in names)  # the old layout is gone
    for name in names:
        expected = (
            "llm"
            if ".language_model." in f".{name}"
            else "merger"
            if ".merger." in name
            else "patch_embed"
            if ".patch_embed." in name
            else "vision"
            if ".visual." in f".{name}"
            else "lm_head"
        )
        assert part_of(name) == expected, name
        assert part_of("base_model.model." + name) == expected, name
    assert {part_of(n) for n in names} == {"llm", "vision", "merger", "patch_embed", "lm_head"}


def _wrapped_modules(model, recipe, family):
    from peft import get_peft_model

    peft_model = get_peft_model(model, create_lora_config(recipe, family))
    return [
        name
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and not name.endswith(("lora_A", "lora_B"))
    ], peft_model


@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl"])
def family_model(request, tiny_model_dir):
    if request.param == "qwen2_vl":
        from transformers import AutoModelForImageTextToText

        return "qwen2_vl", AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    return "qwen2_5_vl", tiny_qwen2_5_vl()


@pytest.mark.parametrize("key", ["r1-llm-only", "r2-vision-only", "r4-joint"])
def test_lora_wraps_only_the_recipe_parts(family_model, key):
    family, model = family_model
    recipe = RECIPES[key]
    wrapped, peft_model = _wrapped_modules(model, recipe, family)
    parts = {part_of(name) for name in wrapped}
    assert parts == set(recipe.trains())
    assert not any("patch_embed" in name for name in wrapped)
    if key == "r1-llm-only":  # Qwen2.5-VL's vision MLP shares gate/up/down_proj names with the LLM
        assert not any(".visual." in name for name in wrapped)
    counts = apply_freeze_policy(peft_model, recipe)
    assert set(counts) == set(recipe.trains())
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_vision_targets_per_family_hit_every_vision_linear(family_model):
    family, model = family_model
    vision_linears = [
        n
        for n, m in model.named_modules()
        if type(m).__name__ == "Linear" and re.search(r"visual\.(blocks|merger)\.", n)
    ]
    wrapped, _ = _wrapped_modules(model, RECIPES["r2-vision-only"], family)
    assert sorted(n.removeprefix("base_model.model.") for n in wrapped) == sorted(vision_linears)


def test_target_regex_never_matches_patch_embed_or_other_parts():
    pattern = re.compile(target_regex({"vision"}, "qwen2_5_vl"))
    assert pattern.fullmatch("model.visual.blocks.0.mlp.gate_proj")
    assert not pattern.fullmatch("model.visual.patch_embed.proj")
    assert not pattern.fullmatch("model.language_model.layers.0.mlp.gate_proj")
    with pytest.raises(ValueError, match="unsupported model family"):
        target_regex({"llm"}, "llava")


def _one_batch(model_dir, data_dir, processor):
    from src.data.collators import AssistantOnlyCollator
    from src.data.dataset import build_dataset

    dataset, _ = build_dataset(str(data_dir), "train", "qwen2_vl", processor)
    return AssistantOnlyCollator(processor)([dataset[0], dataset[1]])


@pytest.mark.parametrize("key", ["r1-llm-only", "r2-vision-only"])
def test_frozen_vision_runs_outside_autograd_and_the_llm_still_learns(
    key, tiny_model_dir, tiny_data_dir, tiny_processor
):
    """r1's tower gets no backward pass at all; r2's (which trains) keeps its own."""
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    from src.models.freeze import keep_frozen_vision_out_of_autograd, vision_tower

    recipe = RECIPES[key]
    model = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(tiny_model_dir), create_lora_config(recipe, "qwen2_vl")
    )
    apply_freeze_policy(model, recipe)
    model.enable_input_require_grads()  # what the trainer does; it used to drag the tower into autograd
    applied = keep_frozen_vision_out_of_autograd(model, recipe)
    backward_calls = []
    for block in vision_tower(model).blocks:
        block.register_full_backward_hook(lambda *args: backward_calls.append(1))

    model(**_one_batch(tiny_model_dir, tiny_data_dir, tiny_processor)).loss.backward()

    assert applied is (key == "r1-llm-only")
    assert (not backward_calls) is applied
    lora_b_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad]
    assert lora_b_grads and all(g is not None and g.abs().sum() > 0 for g in lora_b_grads)


# ---------------------------------------------------------------- every family, every recipe, by part
def piece_of(name: str) -> str:
    """The finest part a trainable parameter belongs to, read from its path independently of part_of."""
    for piece, marker in (
        ("deepstack", ".deepstack_merger_list."),
        ("merger", ".visual.merger."),
        ("vision", ".visual.blocks."),
        ("llm", ".language_model.layers."),
        ("lm_head", "lm_head."),
    ):
        if marker in f".{name}":
            return piece
    return name  # anything else (embeddings, patch_embed, pos_embed) must never train


# What each recipe trains, by piece: DeepStack mergers go with the merger (src/contract/families.py says why).
EXPECTED_PIECES = {
    "r1-llm-only": {"llm"},
    "r2-vision-only": {"vision", "merger", "deepstack"},
    "stage1-vision": {"vision", "merger", "deepstack"},
    "stage2-llm": {"llm"},
    "r4-joint": {"vision", "merger", "deepstack", "llm"},
    "full-merger-and-head": {"llm", "merger", "deepstack", "lm_head"},
}
BUILDERS = {"qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl, "qwen3_5": tiny_qwen3_5}


def _stages():
    from dataclasses import replace

    r3 = RECIPES["r3-two-stage"]
    full = replace(
        RECIPES["r1-llm-only"], name="full-merger-and-head", train_merger="full", train_lm_head="full"
    )
    return [RECIPES["r1-llm-only"], RECIPES["r2-vision-only"], *r3.stages, RECIPES["r4-joint"], full]


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("stage", _stages(), ids=lambda s: s.name)
def test_each_recipe_trains_exactly_its_pieces_in_every_family(family, stage):
    """Vision blocks, merger, DeepStack mergers, LLM and lm_head, checked on the trainable parameters of
    the wrapped model; the patch and position embeddings never train; every linear of a trained LoRA part
    is wrapped (Qwen3.5's Gated DeltaNet projections included)."""
    from peft import get_peft_model

    model = BUILDERS[family]()
    model.config.tie_word_embeddings = False
    peft_model = get_peft_model(model, create_lora_config(stage, family, model))
    apply_freeze_policy(peft_model, stage)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    expected = EXPECTED_PIECES[stage.name] - ({"deepstack"} if family != "qwen3_vl" else set())
    assert {piece_of(n) for n in trainable} == expected
    assert not any(re.search(r"patch_embed|pos_embed|embed_tokens", n) for n in trainable)
    if stage.train_llm == "lora" and family == "qwen3_5":
        wrapped = {m.group(1) for n in trainable if (m := re.search(r"\.linear_attn\.(\w+)\.lora_A\.", n))}
        assert wrapped == {"in_proj_qkv", "in_proj_z", "out_proj"}


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_qwen3_vision_targets_hit_every_linear_of_the_tower_and_mergers(family):
    model = BUILDERS[family]()
    linears = [
        n
        for n, m in model.named_modules()
        if type(m).__name__ == "Linear" and re.search(r"visual\.(blocks|merger|deepstack_merger_list)\.", n)
    ]
    wrapped, _ = _wrapped_modules(model, RECIPES["r2-vision-only"], family)
    assert sorted(n.removeprefix("base_model.model.") for n in wrapped) == sorted(linears)
    assert any("deepstack_merger_list" in n for n in linears) is (family == "qwen3_vl")
