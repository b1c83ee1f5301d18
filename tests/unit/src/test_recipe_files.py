"""Recipes from a TOML file: the schema, its checks, the registry the launcher and workers share, and
"full" training (PEFT modules_to_save) on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipe_runner.cli import main as cli
from recipe_runner.planning.jobs import WORKER_ENV
from recipe_runner.planning.request import resolve_recipes
from src.planning import memory as planner
from src.planning.parameters import ModelShape, lora_parameters
from src.recipes import (
    ALIASES,
    BUILT_IN,
    RECIPES,
    SHIPPED_FILE,
    RecipeFileError,
    forget_recipe_files,
    read_recipes_file,
    resolve_recipe,
    use_recipes_file,
)
from tests.conftest import REPO, tiny_run_options

EXAMPLE = REPO / "examples" / "r5.toml"


@pytest.fixture(autouse=True)
def built_ins_only():
    """Every test starts and ends with the four built-in recipes registered, nothing else."""
    forget_recipe_files()
    yield
    forget_recipe_files()


def write(tmp_path: Path, text: str, name: str = "mine.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the schema ----------------------------------------------------------------------------------------


def test_the_shipped_file_is_the_built_in_recipes():
    assert BUILT_IN == ("r1-llm-only", "r2-vision-only", "r3-two-stage", "r4-joint")
    assert {r.name: r for r in read_recipes_file(SHIPPED_FILE, {})} == {k: RECIPES[k] for k in BUILT_IN}


def test_the_shipped_file_ships_in_the_package():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"recipes.toml"' in pyproject and SHIPPED_FILE.parent == REPO / "src"


def test_the_example_r5_loads_and_joins_the_registry():
    assert use_recipes_file(EXAMPLE) == ["r5-llm-merger"]
    r5 = resolve_recipe("r5")
    assert r5 is RECIPES["r5-llm-merger"] and ALIASES["r5"] == "r5-llm-merger"
    assert r5.modes() == {"merger": "full", "llm": "lora"} and not r5.quantized and r5.problems() == []
    assert resolve_recipes("all")[-1] == "r5-llm-merger" and resolve_recipes("r4,r5") == ["r4-joint", r5.name]
    assert use_recipes_file(EXAMPLE) == ["r5-llm-merger"]  # the launcher and the worker may both load it


def test_from_and_chains_read_like_the_python_recipes(tmp_path):
    path = write(
        tmp_path,
        """
[r6-wide]
from = "r4"
lora_rank = 64
lora_target_modules = ["q_proj", "v_proj"]

[r7-merger-then-llm]
description = "merger fully, merged; then LoRA on the LLM with the head trained"

[[r7-merger-then-llm.stages]]  # the long form of stages = [{ ... }, { ... }]
from = "r2-vision-only"
name = "stage1-merger"
train_vision = "frozen"
train_merger = "full"
train_llm = "lora"

[[r7-merger-then-llm.stages]]
from = "r6-wide"
name = "stage2-llm"
train_vision = "frozen"
train_merger = "frozen"
train_lm_head = "full"
""",
    )
    assert use_recipes_file(path) == ["r6-wide", "r7-merger-then-llm"]
    wide, chain = RECIPES["r6-wide"], RECIPES["r7-merger-then-llm"]
    assert (wide.lora_rank, wide.lora_alpha, wide.lora_target_modules) == (64, 32, ("q_proj", "v_proj"))
    assert wide.learning_rate == RECIPES["r4-joint"].learning_rate
    assert [s.name for s in chain.stages] == ["stage1-merger", "stage2-llm"]
    assert chain.how() == "merger=full llm=lora -> llm=lora lm_head=full"
    assert chain.stages[1].lora_rank == 64 and chain.train_merger == "full" and chain.problems() == []


BAD_FILES = {
    "unknown key": ('[r5-x]\nfrom = "r4"\ntrain_mergr = "full"\n', "r5-x", "train_mergr", "did you mean"),
    "wrong type": ('[r5-x]\nfrom = "r4"\nlora_rank = "16"\n', "r5-x", "lora_rank", "whole number"),
    "bad mode": ('[r5-x]\nfrom = "r4"\ntrain_merger = "half"\n', "r5-x", "train_merger='half'", "'full'"),
    "full on a 4-bit LLM": ('[r5-x]\nfrom = "r1"\ntrain_llm = "full"\n', "r5-x", "train_llm", "'lora'"),
    "full LLM": ('[r5-x]\nfrom = "r4"\ntrain_llm = "full"\n', "r5-x", "train_llm", "'lora'"),
    "LoRA on lm_head": ('[r5-x]\nfrom = "r4"\ntrain_lm_head = "lora"\n', "r5-x", "train_lm_head", "'full'"),
    "built-in name": ('[r4-joint]\nfrom = "r2"\n', "r4-joint", "name is taken", "rename"),
    "built-in alias": ('[r1-mine]\nfrom = "r2"\n', "r1-mine", "alias r1", "unused number"),
    "missing fields": ('[r5-x]\ndescription = "d"\n', "r5-x", "quantized, train_vision, train_llm", "from ="),
    "unknown from": ('[r5-x]\nfrom = "r9"\n', "r5-x", "from = 'r9'", "defined above"),
    "chain in a chain": (
        '[r5-x]\ndescription = "d"\nstages = [{ from = "r3", name = "s1" }]\n',
        "r5-x, stage 1 (s1)",
        "from = 'r3' is a chain",
        "stages' recipes",
    ),
    "stages in a stage": (
        '[r5-x]\ndescription = "d"\nstages = [{ from = "r4", name = "s1", stages = [] }]\n',
        "r5-x, stage 1 (s1)",
        "stages",
        "chains do not nest",
    ),
    "setting beside stages": (
        '[r5-x]\ndescription = "d"\nlearning_rate = 1e-3\nstages = [{ from = "r4", name = "s1" }]\n',
        "r5-x",
        "learning_rate",
        "into the stages",
    ),
    "stage without a name": (
        '[r5-x]\ndescription = "d"\nstages = [{ from = "r4" }]\n',
        "r5-x, stage 1",
        "name",
        "e.g.",
    ),
    "no LoRA part": (
        '[r5-x]\nfrom = "r4"\ntrain_vision = "frozen"\ntrain_llm = "frozen"\ntrain_merger = "full"\n',
        "r5-x",
        "LoRA",
        "set one of",
    ),
    "not TOML": ("[r5-x\n", "", "not valid TOML", "fix the syntax"),
    "not a table": ('r5 = "r4"\n', "r5", "table", "[r5]"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_each_bad_field_is_refused_naming_file_recipe_field_and_fix(tmp_path, case):
    text, recipe, field, fix = BAD_FILES[case]
    path = write(tmp_path, text)
    with pytest.raises(RecipeFileError) as refused:
        use_recipes_file(path)
    (problem,) = refused.value.problems  # one message for the one bad thing
    assert problem.startswith(f"{path}: ") and (f"recipe {recipe}" in problem or not recipe), problem
    assert field in problem and fix in problem, problem
    assert list(RECIPES) == list(BUILT_IN)  # nothing registered


def test_two_files_cannot_define_the_same_recipe(tmp_path):
    use_recipes_file(EXAMPLE)
    other = write(tmp_path, '[r5-llm-merger]\nfrom = "r4"\n', "other.toml")
    with pytest.raises(RecipeFileError, match="taken by the recipe r5-llm-merger"):
        use_recipes_file(other)


# --- the launcher ----------------------------------------------------------------------------------------


def test_plan_with_a_bad_file_exits_2_and_writes_nothing(tmp_path, capsys):
    bad = write(tmp_path, '[r5-x]\nfrom = "r4"\ntrain_merger = "half"\n')
    out = tmp_path / "out"
    code = cli.main(
        ["plan", "--recipes-file", str(bad), "--recipes", "r5", "--cpu", "--output-dir", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert f"--recipes-file {bad}" in err and "recipe r5-x: train_merger='half'" in err


def test_every_worker_gets_the_file_by_its_absolute_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(WORKER_ENV, json.dumps(["python", "worker.py"]))
    monkeypatch.chdir(REPO)
    argv = ["plan", "--recipes-file", "examples/r5.toml", "--recipes", "r4,r5", "--cpu"]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "command:" in line]
    assert len(commands) == 2 and all(f"--recipes-file {EXAMPLE}" in line for line in commands)
    assert "--recipe r5-llm-merger" in commands[1]


def test_list_shows_the_files_recipes_and_how_each_part_trains(capsys):
    assert cli.main(["list", "--recipes-file", str(EXAMPLE)]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert list(rows) == [*BUILT_IN, "r5-llm-merger"]
    assert "merger=full llm=lora" in rows["r5-llm-merger"] and "r5.toml" in rows["r5-llm-merger"]
    assert "vision=lora merger=lora -> llm=lora" in rows["r3-two-stage"] and "built-in" in rows["r4-joint"]


def test_the_worker_resolves_the_same_recipes(tmp_path):
    from src.training.worker import parse_worker_args

    args, recipe = parse_worker_args(["--recipe", "r5", "--recipes-file", str(EXAMPLE), "--cpu"])
    assert recipe is RECIPES["r5-llm-merger"] and args.output_dir == "outputs/r5-llm-merger"
    bad = write(tmp_path, '[r5-x]\nfrom = "r4"\nlora_rank = 0\n')
    with pytest.raises(SystemExit) as refused:
        parse_worker_args(["--recipe", "r4", "--recipes-file", str(bad)])
    assert refused.value.code == 2


# --- the memory planner --------------------------------------------------------------------------------


def test_a_fully_trained_part_costs_its_copy_grad_and_adam_states_in_bf16():
    from src.planning.shapes import SHAPES, VISION

    shape = ModelShape.from_config({**SHAPES["7b"], "model_type": "qwen2_vl", "vision_config": VISION})
    use_recipes_file(EXAMPLE)
    r5, r1 = RECIPES["r5-llm-merger"], RECIPES["r1-llm-only"]
    merger = planner.full_parameters(shape, r5)
    d = shape.merger_hidden
    assert merger == d * d + d + d * shape.hidden + shape.hidden + 2 * shape.vision_embed  # linears, ln_q
    lora = lora_parameters(shape, r5)
    assert lora == lora_parameters(shape, r1)  # the same LLM adapters, the merger has none
    assert planner.trainable_state_bytes(shape, r5) == lora * 4 * 4 + merger * 2 * 4
    head = planner.full_parameters(shape, r5.__class__(**{**r5.__dict__, "train_lm_head": "full"}))
    assert head == merger + shape.vocab * shape.hidden
    estimate = planner.estimate_recipe_memory(shape, r5, 4, 1200, 100, checkpointing=True)
    assert estimate.trainable_state == planner.trainable_state_bytes(shape, r5)


# --- "full" on the tiny model -------------------------------------------------------------------------


def _wrapped(tiny_model_dir, recipe):
    from src.training.run import load_wrapped_model

    return load_wrapped_model(recipe, str(tiny_model_dir), "cpu", "qwen2_vl")


def test_full_parts_are_modules_to_save_and_counted_per_part(tiny_model_dir):
    from dataclasses import replace

    from src.models.lora import create_lora_config

    use_recipes_file(EXAMPLE)
    r5 = RECIPES["r5-llm-merger"]
    model, trainable = _wrapped(tiny_model_dir, r5)
    merger = sum(p.numel() for n, p in model.named_parameters() if ".merger.original_module." in n)
    assert trainable["merger"] == merger and trainable["llm"] > 0 and "vision" not in trainable
    everything = replace(r5, train_vision="full", train_lm_head="full")
    config = create_lora_config(everything, "qwen2_vl", model.base_model.model)
    assert config.modules_to_save == ["lm_head", "visual.merger", "visual.blocks.0", "visual.blocks.1"]
    model.base_model.model.config.tie_word_embeddings = True  # as Qwen2-VL-2B
    with pytest.raises(ValueError, match="ties lm_head to embed_tokens"):
        create_lora_config(everything, "qwen2_vl", model.base_model.model)


@pytest.mark.slow
def test_r5_trains_the_merger_and_llm_adapters_and_leaves_the_vision_blocks(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from src.training.run import prepare_stage, save_stage

    use_recipes_file(EXAMPLE)
    r5 = RECIPES["r5-llm-merger"]
    opts = tiny_run_options(tiny_model_dir, tiny_data_dir, tmp_path, max_steps=2)
    prepared = prepare_stage(r5.name, r5, str(tiny_model_dir), opts, tmp_path)
    before = {n: p.detach().clone() for n, p in prepared.model.named_parameters()}
    prepared.trainer.train()
    after = dict(prepared.model.named_parameters())

    def changed(fragment: str) -> list[bool]:
        return [not torch.equal(before[n], after[n]) for n in before if fragment in n]

    assert changed(".merger.modules_to_save.") and all(changed(".merger.modules_to_save.mlp."))
    assert not any(changed(".merger.original_module."))
    assert changed("visual.blocks.") and not any(changed("visual.blocks."))
    assert all(changed("lora_B"))  # LoRA B starts at zero; every one moved
    # The adapter folder carries the trained merger: loading it gives the same merger (what export does).
    adapter = save_stage(prepared.model, prepared.processor, tmp_path, False, r5.name, r5.name)
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir))
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    trained = after["base_model.model.model.visual.merger.modules_to_save.default.mlp.0.weight"]
    assert torch.equal(merged.model.visual.merger.mlp[0].weight, trained.detach())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
def test_planner_activations_of_a_full_merger_match_what_autograd_saves(checkpointing):
    """r5 on CPU in bf16: the merger keeps its linears' inputs; frozen blocks keep nothing but checkpoints."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText
    from trl.trainer.utils import add_fused_lm_head

    from src.models.freeze import apply_freeze_policy, keep_frozen_vision_out_of_autograd
    from src.models.lora import create_lora_config
    from tests.unit.src.planning.test_memory import (
        SIZES,
        part_sum,
        planner_batch,
        saved_bytes_per_part,
        tiny_batch,
        tiny_config,
    )

    use_recipes_file(EXAMPLE)
    stage = RECIPES["r5-llm-merger"]
    config, inputs = tiny_config(*SIZES["larger"][0]), tiny_batch(*SIZES["larger"][1])
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_config(config).to(torch.bfloat16)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    model = get_peft_model(base, create_lora_config(stage, config.model_type, base))
    apply_freeze_policy(model, stage)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    keep_frozen_vision_out_of_autograd(model, stage)
    measured = saved_bytes_per_part(model, inputs)
    shape, batch = planner_batch(config, inputs)
    predicted = planner.activation_parts(shape, stage, batch, checkpointing, True, planner.CPU_KERNELS)
    assert measured["merger0"] == pytest.approx(predicted["merger"], rel=0.01)
    assert part_sum(measured, "vision") == pytest.approx(predicted["vision_blocks"], rel=0.01)
    assert part_sum(measured, "llm") == pytest.approx(predicted["llm_layers"], rel=0.05)
