"""Every shipped recipe is checked as data, without training."""

import subprocess
import sys
from dataclasses import FrozenInstanceError, replace

import pytest

from src.recipes import ALIASES, RECIPES, TrainingRecipe, resolve_recipe
from tests.conftest import REPO


@pytest.mark.parametrize("key", RECIPES)
def test_shipped_recipe_is_well_formed(key):
    recipe = RECIPES[key]
    assert recipe.name == key
    assert recipe.problems() == []
    assert recipe.description


def test_plan_recipe_keys_and_aliases():
    assert list(RECIPES) == ["r1-llm-only", "r2-vision-only", "r3-two-stage", "r4-joint"]
    assert ALIASES == {"r1": "r1-llm-only", "r2": "r2-vision-only", "r3": "r3-two-stage", "r4": "r4-joint"}
    assert resolve_recipe("r3") is RECIPES["r3-two-stage"]
    with pytest.raises(KeyError, match="r1-llm-only"):
        resolve_recipe("r5")


def test_parts_each_recipe_trains():
    assert RECIPES["r1-llm-only"].trains() == ["llm"]
    assert RECIPES["r2-vision-only"].trains() == ["vision", "merger"]
    assert RECIPES["r4-joint"].trains() == ["vision", "merger", "llm"]
    assert RECIPES["r1-llm-only"].quantized and not RECIPES["r2-vision-only"].quantized


def test_r3_is_vision_then_llm_as_data():
    stage1, stage2 = RECIPES["r3-two-stage"].stages
    assert (stage1.trains(), stage1.quantized) == (["vision", "merger"], False)
    assert (stage2.trains(), stage2.quantized) == (["llm"], True)


def test_a_chain_is_quantized_when_one_of_its_stages_is():
    # the planner asks a recipe, not its stages, whether it has 4-bit weights to dequantize
    for recipe in RECIPES.values():
        if recipe.stages:
            assert recipe.quantized == any(stage.quantized for stage in recipe.stages), recipe.name


def test_recipes_are_frozen_and_problems_name_the_field():
    with pytest.raises(FrozenInstanceError):
        RECIPES["r1-llm-only"].learning_rate = 1.0
    bad = replace(RECIPES["r1-llm-only"], train_llm="full", learning_rate=2.0)
    problems = " ".join(bad.problems())
    assert "train_llm='full'" in problems and "learning_rate=2.0" in problems
    nothing = TrainingRecipe("x", "d", quantized=False, train_vision="frozen", train_llm="frozen")
    assert "trains nothing" in nothing.problems()[0]


def test_recipe_table_imports_no_torch():
    code = "import sys, src.recipes, src.contract.progress; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_explains_every_recipe():
    readme = (REPO / "README.md").read_text()
    for key in RECIPES:
        assert f"`{key}`" in readme


def test_with_lora_resizes_a_recipe_and_every_stage():
    from src.recipes import lora_sizes, with_lora

    r3 = with_lora(RECIPES["r3-two-stage"], rank=64, alpha=None, dropout=0.1)
    assert [(s.lora_rank, s.lora_alpha, s.lora_dropout) for s in r3.stages] == [(64, 32, 0.1)] * 2
    assert lora_sizes(r3) == {"rank": 64, "alpha": 32, "dropout": 0.1} and r3.problems() == []
    assert with_lora(RECIPES["r4-joint"]) is RECIPES["r4-joint"]  # nothing asked, nothing changed
    assert with_lora(RECIPES["r4-joint"], rank=0).problems()  # a recipe checks its own sizes
