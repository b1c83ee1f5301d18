"""Checkpoints and resume: a run that died continues where it stopped and ends where it would have."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from src.contract.env import FAULT_ENV
from src.recipes import RECIPES
from src.training.run import run_recipe
from src.utils.files import atomic_dir
from tests.conftest import tiny_run_options, worker_argv

pytestmark = pytest.mark.slow


def _options(tiny_model_dir, tiny_data_dir, out, **extra):
    return tiny_run_options(tiny_model_dir, tiny_data_dir, out, max_steps=4, save_steps=2, seed=7, **extra)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    recipe = RECIPES["r4-joint"]  # bf16/fp32 LoRA on every part, with dropout: RNG state matters
    run_recipe(recipe, _options(tiny_model_dir, tiny_data_dir, tmp_path / "straight"))

    monkeypatch.setenv(FAULT_ENV, "r4-joint:3")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_recipe(recipe, _options(tiny_model_dir, tiny_data_dir, tmp_path / "crashed"))
    assert (tmp_path / "crashed" / "trainer" / "checkpoint-2").is_dir()
    assert not (tmp_path / "crashed" / "adapter").exists()  # nothing half-written
    monkeypatch.delenv(FAULT_ENV)
    (result,) = run_recipe(recipe, _options(tiny_model_dir, tiny_data_dir, tmp_path / "crashed", resume=True))
    assert result.steps == 4

    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "crashed" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:  # same seed, same data order, same RNG: equal up to float rounding
        assert torch.allclose(straight[name], resumed[name], rtol=0, atol=1e-6), name


def test_worker_resume_keeps_the_finished_stage_of_r3(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "r3"
    command = worker_argv("r3", tiny_model_dir, tiny_data_dir, out, "--cpu")
    env = {**os.environ, FAULT_ENV: "stage2-llm:1:kill"}
    died = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert died.returncode == -9
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "running" and [s["name"] for s in status["stages"]] == ["stage1-vision"]
    merged = out / "stage1-vision" / "merged" / "model.safetensors"
    first_mtime = merged.stat().st_mtime_ns

    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "succeeded" and status["resumed"] == 1
    assert [s["name"] for s in status["stages"]] == ["stage1-vision", "stage2-llm"]
    assert merged.stat().st_mtime_ns == first_mtime  # stage 1 was not trained again
    assert "already finished" in (out / "train.log").read_text()


def test_atomic_dir_keeps_the_previous_output_when_writing_fails(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise OSError("disk full")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
