"""The planner on the Qwen3-VL-8B and Qwen3.5 shapes: memory and step-time estimates for every recipe, the
planner's own CLI, and `recipe-run plan` on a config-only Qwen3-VL-8B folder (config.json and
preprocessor_config.json, no weights, no tokenizer). Torch-free: config values only."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from src.planning import memory as planner
from src.planning.memory import estimate_recipe_memory
from src.planning.parameters import ModelShape, llm_layer_counts
from src.planning.shapes import QWEN3_VL_8B_CONFIG, QWEN3_VL_PREPROCESSOR
from src.planning.step_time import launch_seconds, predict_step_seconds, rank_settings, sample_flops
from src.recipes import RECIPES

GIB = 2**30
PATCHES_644x476, TEXT_TOKENS = 1200, 102  # at patch 16 a 644x476 image is 480x640: 1200 patches, 300 tokens


def qwen3_vl_8b() -> ModelShape:
    return ModelShape.from_config(QWEN3_VL_8B_CONFIG)


def qwen3_5() -> ModelShape:
    """transformers' Qwen3_5Config defaults, as config values (no torch)."""
    text = {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "vocab_size": 248320,
    }
    vision = {"out_hidden_size": 3584}
    return ModelShape.from_config({"model_type": "qwen3_5", "text_config": text, "vision_config": vision})


@pytest.mark.parametrize("shape", [qwen3_vl_8b, qwen3_5])
@pytest.mark.parametrize("key", RECIPES)
def test_every_recipe_has_an_estimate_on_the_qwen3_shapes(key, shape):
    model, recipe = shape(), RECIPES[key]
    on = estimate_recipe_memory(model, recipe, 4, PATCHES_644x476, TEXT_TOKENS, checkpointing=True)
    off = estimate_recipe_memory(model, recipe, 4, PATCHES_644x476, TEXT_TOKENS, checkpointing=False)
    assert min(on.weights, on.trainable_state, on.activations, on.workspace, on.overhead) > 0
    assert on.total < off.total < 80 * GIB
    seconds = [
        predict_step_seconds(model, recipe, 4, 4, PATCHES_644x476, TEXT_TOKENS, ckpt, compiled)
        for ckpt, compiled in ((False, False), (True, False), (False, True))
    ]
    assert seconds[1] > seconds[0] > seconds[2] > 0  # recompute costs, compiling saves


def test_the_8b_weights_and_what_4_bit_saves():
    shape = qwen3_vl_8b()
    assert planner.weight_bytes(shape, quantized=False) == 2 * 8_767_123_696
    assert planner.weight_bytes(shape, quantized=True) < 0.45 * planner.weight_bytes(shape, quantized=False)
    args = (4, PATCHES_644x476, TEXT_TOKENS, True)
    r1, r4 = (estimate_recipe_memory(shape, RECIPES[k], *args) for k in ("r1-llm-only", "r4-joint"))
    assert r1.total < r4.total and r1.activations < r4.activations


def test_deepstack_mergers_cost_memory_where_the_tower_trains():
    """The DeepStack mergers' weights always; their activations (and the gradients they send back into the
    tower) only where the tower or the merger trains: a frozen tower runs under no_grad."""
    shape = qwen3_vl_8b()
    without = dataclasses.replace(shape, deepstack_mergers=0)
    args = (4, PATCHES_644x476, TEXT_TOKENS, False)
    for key in ("r2-vision-only", "r4-joint"):
        with_it, bare = (estimate_recipe_memory(s, RECIPES[key], *args) for s in (shape, without))
        assert with_it.activations > bare.activations and with_it.weights > bare.weights
    r1, r1_bare = (estimate_recipe_memory(s, RECIPES["r1-llm-only"], *args) for s in (shape, without))
    assert r1.activations == r1_bare.activations and r1.weights > r1_bare.weights


def test_a_gated_deltanet_layer_keeps_more_than_an_attention_layer_and_its_scan_costs_launches():
    """transformers' reference delta rule keeps fp32 chunk tensors: per token more than an attention layer;
    its scan is a loop over the sequence's chunks of 64, one more chunk a step more."""
    shape = qwen3_5()
    assert llm_layer_counts(shape) == {"full_attention": 8, "linear_attention": 24}
    batch = planner.Batch(4, PATCHES_644x476, TEXT_TOKENS, TEXT_TOKENS)
    stage = RECIPES["r4-joint"]
    wrapped = planner.lora_targets(shape, stage)
    args = (stage.lora_rank, stage.lora_dropout, planner.adapter_bytes(stage))
    layers = planner.llm_layers_of_each_kind(shape, wrapped["llm"], batch, *args)
    assert layers["linear_attention"] > 1.5 * layers["full_attention"]
    one_chunk, two_chunks = (launch_seconds(shape, 4 * 64, text) for text in (0, 1))  # 64, 65 tokens
    assert two_chunks > one_chunk
    attention_only = dataclasses.replace(shape, linear_attention=None)
    flops = [sample_flops(s, stage, PATCHES_644x476, TEXT_TOKENS) for s in (shape, attention_only)]
    assert flops[0] != flops[1]


def test_batch_size_auto_picks_a_fitting_setting_for_the_8b_on_an_80_gib_card():
    ranked = rank_settings(qwen3_vl_8b(), RECIPES["r4-joint"], 16, 80 * GIB, PATCHES_644x476, TEXT_TOKENS)
    assert ranked[0].fits and 16 % ranked[0].micro_batch == 0
    assert not rank_settings(qwen3_vl_8b(), RECIPES["r4-joint"], 16, 8 * GIB, PATCHES_644x476, 88)[0].fits


def test_the_planner_cli_takes_the_qwen3_vl_8b_shape(capsys):
    assert planner.main(["--shape", "qwen3-vl-8b"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in RECIPES)
    # the same numbers as a model folder holding the published config.json and preprocessor_config.json
    assert "'weights': 16.33" in out


def config_only_qwen3_vl_8b(root):
    """A Qwen3-VL-8B folder as the planner needs it: config.json and preprocessor_config.json only."""
    model = root / "qwen3-vl-8b"
    model.mkdir()
    with open(model / "config.json", "w") as config:
        json.dump(QWEN3_VL_8B_CONFIG, config)
    with open(model / "preprocessor_config.json", "w") as preprocessor:
        json.dump(QWEN3_VL_PREPROCESSOR, preprocessor)
    return model


# recipe, GPU size, the peak at --batch-size 4, the verdict, what --batch-size auto would run
PLAN_ROW = re.compile(r"^(r\d\S*)\s+80 GiB\s+([\d.]+) GiB \(recompute o\w+\)\s+(fits|does not fit)\s+(.+)$")


def test_recipe_run_plan_answers_for_a_config_only_qwen3_vl_8b_folder(tmp_path, monkeypatch, capsys):
    from recipe_runner.cli import main as cli
    from src.fixtures.synthetic import write_dataset

    monkeypatch.setenv("RECIPE_RUNNER_FAKE_GPUS", "none")  # no GPU, no NVML: --gpu-memory needs neither
    model = config_only_qwen3_vl_8b(tmp_path)
    data = write_dataset(tmp_path / "data", train=3, test=1, size=(644, 476))
    argv = ["plan", "--recipes", "all", "--gpu-memory", "80", "--model-id", str(model)]
    assert cli.main([*argv, "--dataset", str(data)]) == 0
    out = capsys.readouterr().out
    assert "36 layers, hidden 4096" in out and f"{PATCHES_644x476} image patches" in out  # patch 16
    rows = [match.groups() for line in out.splitlines() if (match := PLAN_ROW.match(line))]
    assert [row[0] for row in rows] == list(RECIPES)
    peaks = {recipe: float(peak) for recipe, peak, _, _ in rows}
    assert all(peak > 0 for peak in peaks.values()) and all(row[2] == "fits" for row in rows)
    assert peaks["r4-joint"] > peaks["r1-llm-only"]
    assert all(re.match(r"\d+ x \d+, recompute o", row[3]) for row in rows)  # what --batch-size auto runs


# The core's peaks at Qwen3-VL-8B (random weights), 8 x 2, compiled, recompute off, 644x476 images, 100 text
# tokens a sample, one H100 80GB (docs/benchmarks.md, 2026-12-07). r1 and r3's stage 2 dequantized their
# 4-bit weights once (12.94 GiB of bf16 copies); r3's stages measured what r2 and r1 did.
H100_8B_PEAKS = [
    ("r4-joint", False, 55.45),
    ("r2-vision-only", False, 42.13),
    ("r1-llm-only", True, 45.45),
]


@pytest.mark.parametrize(("key", "dequantized", "gib"), H100_8B_PEAKS)
def test_the_8b_plan_is_within_5_percent_of_the_measured_peak(key, dequantized, gib):
    estimate = estimate_recipe_memory(
        qwen3_vl_8b(), RECIPES[key], 8, PATCHES_644x476, 100, False, compiled=True, dequantized=dequantized
    )
    assert estimate.gib == pytest.approx(gib, rel=0.05)


def test_copies_dequantized_once_are_planned_and_compile_as_bf16_layers_do():
    r1 = RECIPES["r1-llm-only"]

    def estimate(**options):
        return estimate_recipe_memory(qwen3_vl_8b(), r1, 8, PATCHES_644x476, 100, False, **options)

    eager, copies = estimate(), estimate(dequantized=True)
    assert (copies.weights - eager.weights) / GIB == pytest.approx(
        12.94, abs=0.01
    )  # the copies the run logged
    assert estimate(compiled=True).activations == eager.activations  # 4-bit layers stay eager uncompiled
    assert estimate(compiled=True, dequantized=True).activations < copies.activations
    # A bf16 stage has nothing to dequantize: the option changes nothing.
    r4 = RECIPES["r4-joint"]
    args = (qwen3_vl_8b(), r4, 8, PATCHES_644x476, 100, False)
    assert estimate_recipe_memory(*args, dequantized=True) == estimate_recipe_memory(*args)
