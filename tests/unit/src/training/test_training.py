"""Each recipe trains a few steps on the tiny model; effects on the weights are checked.

Trainable LoRA tensors change, everything else stays bit-identical to what was loaded
(r1 leaves the vision tower alone, r2 the LLM), every lora_B gets a gradient, r3 runs both
stages with stage 2 starting from stage 1's merged weights, and 4-bit loading works on CPU; the
trainer's settings carry the speed levers (non-blocking batch copies on GPUs only).
"""

from pathlib import Path

import pytest
import torch

from src.contract.families import part_of, trained_parts
from src.recipes import RECIPES
from src.training import run as run_module
from src.training.options import RunOptions
from src.training.run import run_recipe
from tests.conftest import tiny_run_options

pytestmark = pytest.mark.slow


def _base_name(name: str) -> str:
    """A PEFT-wrapped parameter's name as it was before wrapping."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@pytest.fixture
def captured(monkeypatch):
    """Snapshots of every model as loaded, and every model as it was about to be saved."""
    loaded, trained = [], []
    load, save = run_module.load_for_stage, run_module.save_stage

    def load_and_snapshot(stage, model_id, device):
        model = load(stage, model_id, device)
        loaded.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return model

    def snapshot_and_save(model, *args, **kwargs):
        trained.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return save(model, *args, **kwargs)

    monkeypatch.setattr(run_module, "load_for_stage", load_and_snapshot)
    monkeypatch.setattr(run_module, "save_stage", snapshot_and_save)
    return loaded, trained


def _options(tiny_model_dir, tiny_data_dir, out: Path, **extra) -> RunOptions:
    return tiny_run_options(tiny_model_dir, tiny_data_dir, out, **extra)


def _check_effects(stage, before: dict, after: dict) -> None:
    parts = trained_parts(stage)
    lora_b = [n for n in after if "lora_B" in n]
    assert lora_b, "no LoRA weights"
    for name in lora_b:  # lora_B starts at zero: non-zero means it received gradients and moved
        assert after[name].abs().sum() > 0, f"{name} never trained"
        assert part_of(name) in parts, f"{name} is outside the trained parts {parts}"
    for name, value in after.items():
        if "lora_" in name:
            continue
        assert torch.equal(value, before[_base_name(name)]), f"frozen {name} changed"


@pytest.mark.parametrize("key", ["r1-llm-only", "r2-vision-only", "r4-joint"])
def test_single_stage_recipe_trains_its_parts_only(key, captured, tiny_model_dir, tiny_data_dir, tmp_path):
    recipe = RECIPES[key]
    (result,) = run_recipe(recipe, _options(tiny_model_dir, tiny_data_dir, tmp_path))
    loaded, trained = captured
    _check_effects(recipe, loaded[0], trained[0])
    assert result.steps == 3 and result.final_loss is not None
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    history = (tmp_path / "loss_history.jsonl").read_text().splitlines()
    assert len(history) == 3


def test_r1_leaves_vision_tower_untouched_and_r2_the_llm(captured, tiny_model_dir, tiny_data_dir, tmp_path):
    run_recipe(RECIPES["r1-llm-only"], _options(tiny_model_dir, tiny_data_dir, tmp_path / "r1"))
    run_recipe(RECIPES["r2-vision-only"], _options(tiny_model_dir, tiny_data_dir, tmp_path / "r2"))
    (r1_before, r2_before), (r1_after, r2_after) = captured
    r1_vision = [n for n in r1_after if part_of(n) in ("vision", "merger", "patch_embed")]
    r2_llm = [n for n in r2_after if part_of(n) == "llm"]
    assert r1_vision and r2_llm
    assert not any("lora_" in n for n in r1_vision + r2_llm)
    assert all(torch.equal(r1_after[n], r1_before[_base_name(n)]) for n in r1_vision)
    assert all(torch.equal(r2_after[n], r2_before[_base_name(n)]) for n in r2_llm)


def test_r3_runs_both_stages_and_stage2_starts_from_stage1(captured, tiny_model_dir, tiny_data_dir, tmp_path):
    recipe = RECIPES["r3-two-stage"]
    stage1, stage2 = run_recipe(recipe, _options(tiny_model_dir, tiny_data_dir, tmp_path))
    assert stage1.output == tmp_path / "stage1-vision" / "merged"
    assert stage2.output == tmp_path / "stage2-llm" / "adapter"
    assert run_module.is_stage_one_output(stage1.output)
    loaded, trained = captured
    _check_effects(recipe.stages[0], loaded[0], trained[0])
    _check_effects(recipe.stages[1], loaded[1], trained[1])
    # Stage 2 loads W + (alpha/r) * B @ A of stage 1's trained LoRA, not the base W.
    qkv, wrapped = "model.visual.blocks.0.attn.qkv", "base_model.model.model.visual.blocks.0.attn.qkv"
    first = trained[0]
    scale = recipe.stages[0].lora_alpha / recipe.stages[0].lora_rank
    expected = first[f"{wrapped}.base_layer.weight"] + scale * (
        first[f"{wrapped}.lora_B.default.weight"] @ first[f"{wrapped}.lora_A.default.weight"]
    )
    assert not torch.equal(loaded[1][f"{qkv}.weight"], loaded[0][f"{qkv}.weight"])
    assert torch.allclose(loaded[1][f"{qkv}.weight"], expected, atol=1e-6)


def test_r3_checkpoint_runs_stage2_only(tiny_model_dir, tiny_data_dir, tmp_path):
    recipe = RECIPES["r3-two-stage"]
    stage1, _ = run_recipe(recipe, _options(tiny_model_dir, tiny_data_dir, tmp_path / "first"))
    (only,) = run_recipe(
        recipe, _options(tiny_model_dir, tiny_data_dir, tmp_path / "again", checkpoint=str(stage1.output))
    )
    assert only.name == "stage2-llm" and not (tmp_path / "again" / "stage1-vision").exists()


def test_every_lora_b_gets_a_gradient_under_gradient_checkpointing(
    tiny_model_dir, tiny_data_dir, tiny_processor
):
    from peft import get_peft_model

    from src.data.collators import AssistantOnlyCollator
    from src.data.dataset import build_dataset
    from src.models.freeze import apply_freeze_policy
    from src.models.loader import load_model
    from src.models.lora import create_lora_config

    recipe = RECIPES["r4-joint"]
    model = get_peft_model(load_model(str(tiny_model_dir)), create_lora_config(recipe))
    apply_freeze_policy(model, recipe)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    dataset, _ = build_dataset(str(tiny_data_dir), "train", "qwen2_vl", tiny_processor)
    model(**AssistantOnlyCollator(tiny_processor)([dataset[0], dataset[1]])).loss.backward()
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert {part_of(n) for n in lora_b} == {"vision", "merger", "llm"}
    for name, param in lora_b.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"


def test_4bit_loader_on_cpu_keeps_vision_full_precision_and_qlora_steps(
    tiny_model_dir, tiny_data_dir, tmp_path, captured
):
    from src.models.loader import count_quantized_layers, load_quantized_model

    counts = count_quantized_layers(load_quantized_model(str(tiny_model_dir)))
    assert counts.get("llm", 0) > 0 and set(counts) == {"llm"}
    run_recipe(RECIPES["r1-llm-only"], _options(tiny_model_dir, tiny_data_dir, tmp_path))
    loaded, trained = captured
    _check_effects(RECIPES["r1-llm-only"], loaded[0], trained[0])


def test_adapter_input_casts_are_skipped_on_gpus_only(tiny_model_dir, tiny_data_dir, tmp_path):
    """On a GPU, LoRA layers get their bf16 input as is (autocast does the bf16 matmul anyway); the
    CPU, which trains without autocast, keeps PEFT's cast (a 4-bit model's bf16 adapters need it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from src.training.run import prepare_stage, skip_adapter_input_casts

    recipe = RECIPES["r4-joint"]
    opts = tiny_run_options(tiny_model_dir, tiny_data_dir, tmp_path)
    model = prepare_stage(recipe.name, recipe, str(tiny_model_dir), opts, tmp_path).model
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and {m.cast_input_dtype_enabled for m in layers} == {True}
    skip_adapter_input_casts(model)
    assert {m.cast_input_dtype_enabled for m in layers} == {False}


@pytest.mark.parametrize("compile_flag, calls", [(None, 0), (True, 1)])
def test_compile_on_compiles_the_wrapped_model_before_the_trainer_takes_it(
    compile_flag, calls, monkeypatch, tiny_model_dir, tiny_data_dir, tmp_path
):
    """--compile on hands the LoRA-wrapped, frozen model to compile_regions; auto stays off on the CPU."""
    import sys
    import types

    from src.training.run import prepare_stage

    compiled = []
    fake = types.ModuleType("src.training.compile")
    quantized_too = []
    fake.compile_regions = lambda model, dynamic=True, include_quantized=False: (
        compiled.append(model) or quantized_too.append(include_quantized) or 1
    )
    monkeypatch.setitem(sys.modules, "src.training.compile", fake)
    recipe = RECIPES["r4-joint"]
    opts = tiny_run_options(tiny_model_dir, tiny_data_dir, tmp_path, compile=compile_flag)
    prepared = prepare_stage(recipe.name, recipe, str(tiny_model_dir), opts, tmp_path)
    assert len(compiled) == calls
    assert all(model is prepared.model for model in compiled)
    assert not any(quantized_too)  # 4-bit decoder layers stay eager unless RunOptions.compile_quantized
    assert any("lora_B" in name for name, _ in prepared.model.named_parameters())


@pytest.mark.parametrize("device, wanted", [("cuda", True), ("cpu", False)])
def test_non_blocking_copies_reach_the_trainers_accelerator_config_on_gpus_only(device, wanted, tmp_path):
    """SFTConfig takes the dict (transformers builds its AcceleratorConfig from it; the trainer hands
    `non_blocking` to accelerate's data loaders); the CPU, with no copy to overlap, keeps the default.
    A "cuda" SFTConfig can be built on a CPU machine: transformers falls back to the CPU device."""
    from src.training.config import StageSettings, accelerator_options, create_training_config

    settings = StageSettings(output_dir=str(tmp_path), learning_rate=1e-3, device=device)  # on by default
    assert accelerator_options(settings, on_gpu=device == "cuda") == (
        {"non_blocking": True} if wanted else None
    )
    config = create_training_config(settings)
    assert config.accelerator_config.non_blocking is wanted
    assert config.dataloader_pin_memory is wanted  # what makes a non-blocking copy asynchronous
    settings = StageSettings(
        output_dir=str(tmp_path), learning_rate=1e-3, device=device, non_blocking_copies=False
    )
    assert create_training_config(settings).accelerator_config.non_blocking is False


def test_run_options_hand_copies_and_logging_interval_to_the_stage_settings(
    monkeypatch, tiny_model_dir, tiny_data_dir, tmp_path
):
    """The worker's RunOptions fields reach StageSettings (prepare_stage builds them)."""
    from src.training.config import StageSettings
    from src.training.run import prepare_stage

    seen = []
    create = run_module.create_training_config
    monkeypatch.setattr(run_module, "create_training_config", lambda s: seen.append(s) or create(s))
    recipe = RECIPES["r1-llm-only"]
    opts = tiny_run_options(
        tiny_model_dir, tiny_data_dir, tmp_path, non_blocking_copies=False, logging_steps=3
    )
    prepare_stage(recipe.name, recipe, str(tiny_model_dir), opts, tmp_path)
    assert [(s.non_blocking_copies, s.logging_steps) for s in seen] == [(False, 3)]
    assert seen[0].logging_steps != StageSettings.logging_steps  # not the default passing through


def test_the_loss_is_read_back_every_step_on_the_cpu_and_every_ten_on_gpus(tmp_path):
    from src.training.levers import GPU_LOGGING_STEPS, resolve_logging_steps
    from src.training.options import RunOptions

    def resolved(device, asked=None) -> int:
        return resolve_logging_steps(RunOptions("m", "d", tmp_path, device=device, logging_steps=asked))

    assert (resolved("cpu"), resolved("cuda")) == (1, GPU_LOGGING_STEPS) == (1, 10)
    assert resolved("cuda", 1) == 1 and resolved("cpu", 5) == 5  # as asked


def test_offloading_turns_recompute_on_unless_asked_otherwise(tmp_path):
    """Offloading moves the block inputs recompute keeps: "auto" becomes on, on the CPU and on a GPU alike,
    without asking the planner."""
    from src.training.levers import resolve_checkpointing
    from src.training.options import RunOptions

    def resolved(device, offload, asked=None):
        opts = RunOptions(
            "m", "d", tmp_path, device=device, offload_activations=offload, gradient_checkpointing=asked
        )
        return resolve_checkpointing(RECIPES["r4-joint"], opts, planner_inputs=lambda: pytest.fail("asked"))

    assert resolved("cpu", True) is True and resolved("cuda", True) is True
    assert resolved("cpu", False) is None  # the CPU's own rule (off), as before
    assert resolved("cuda", True, asked=True) is True


@pytest.mark.parametrize("cores, workers", [(16, 4), (4, 2)])
def test_a_gpu_worker_collates_with_four_loader_processes_unless_its_cores_are_few(
    monkeypatch, tmp_path, cores, workers
):
    """Four loader processes on a GPU (two left a 7B step waiting on its batches), two on a small share
    of the host's cores; the CPU collates in the training process."""
    from src.training import config as config_module
    from src.training.config import StageSettings, create_training_config

    monkeypatch.setattr(config_module.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    gpu = create_training_config(StageSettings(output_dir=str(tmp_path), learning_rate=1e-3, device="cuda"))
    cpu = create_training_config(StageSettings(output_dir=str(tmp_path), learning_rate=1e-3, device="cpu"))
    assert (gpu.dataloader_num_workers, cpu.dataloader_num_workers) == (workers, 0)
    assert gpu.dataloader_persistent_workers and gpu.dataloader_prefetch_factor == 2


def test_a_fault_fires_at_its_step_when_that_step_is_not_logged(
    monkeypatch, tiny_model_dir, tiny_data_dir, tmp_path
):
    """The reliability tests' hook (FAULT_ENV) must not depend on the logging interval."""
    monkeypatch.setenv(run_module.FAULT_ENV, "r2-vision-only:2")
    # 3 steps, logged every 5: only the last step is logged
    opts = tiny_run_options(tiny_model_dir, tiny_data_dir, tmp_path, logging_steps=5)
    with pytest.raises(RuntimeError, match="injected fault at r2-vision-only step 2"):
        run_recipe(RECIPES["r2-vision-only"], opts)
    assert not (tmp_path / "loss_history.jsonl").exists()  # step 2 ended unlogged, and nothing came after


def test_a_finished_stage_frees_its_model_even_when_held_in_a_cycle(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    # On GPUs accelerate binds an autocast forward to the model itself: a cycle only the collector frees.
    # Before the fix, the trained 7B (15.5 GiB) was still alive when a packed r2's evaluation loaded the
    # base beside it, out of memory under its 18 GiB reservation.
    import gc
    import logging
    import types
    import weakref

    models = []
    load = run_module.load_for_stage

    def load_in_a_cycle(stage, model_id, device):
        model = load(stage, model_id, device)
        model.forward = types.MethodType(type(model).forward, model)  # as accelerate's autocast wrapper
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(run_module, "load_for_stage", load_in_a_cycle)
    # pytest's log capture keeps every record, and a record's arguments can be the stage's objects
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    gc.disable()  # no automatic collection may hide a missing one
    try:
        run_recipe(RECIPES["r3-two-stage"], tiny_run_options(tiny_model_dir, tiny_data_dir, tmp_path))
        assert len(models) == 2 and [ref() for ref in models] == [None, None]
    finally:
        gc.enable()
