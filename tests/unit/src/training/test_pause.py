"""A rung of the learning-rate search is a pause, not a shorter run: paused and resumed, a run ends with the
weights of an uninterrupted one; a trial trains without its validation split and is scored on it."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from src.recipes import RECIPES
from src.training.run import run_recipe
from tests.conftest import tiny_run_options, worker_argv

pytestmark = pytest.mark.slow


def test_paused_and_resumed_runs_end_with_the_weights_of_an_uninterrupted_one(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    recipe = RECIPES["r4-joint"]  # LoRA on every part, with dropout: the RNG state must carry over
    options = {"max_steps": 4, "save_steps": 0, "seed": 7}
    run_recipe(recipe, tiny_run_options(tiny_model_dir, tiny_data_dir, tmp_path / "straight", **options))

    out = tmp_path / "rungs"
    (first,) = run_recipe(recipe, tiny_run_options(tiny_model_dir, tiny_data_dir, out, pause_at=1, **options))
    assert first.paused and first.steps == 1 and (out / "trainer" / "checkpoint-1").is_dir()
    (second,) = run_recipe(
        recipe, tiny_run_options(tiny_model_dir, tiny_data_dir, out, pause_at=3, resume=True, **options)
    )
    assert second.paused and second.steps == 3
    (last,) = run_recipe(recipe, tiny_run_options(tiny_model_dir, tiny_data_dir, out, resume=True, **options))
    assert not last.paused and last.steps == 4

    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    for name in straight:  # same schedule, same data order, same RNG: equal up to float rounding
        assert torch.allclose(straight[name], resumed[name], rtol=0, atol=1e-6), name
    rates = [json.loads(line)["lr"] for line in (out / "loss_history.jsonl").read_text().splitlines()]
    straight_rates = [
        json.loads(line)["lr"]
        for line in (tmp_path / "straight" / "loss_history.jsonl").read_text().splitlines()
    ]
    assert rates == straight_rates  # the schedule of the whole run, not of a 1-step or 3-step one


def test_a_chain_pauses_inside_its_first_stage_and_goes_on_into_the_second(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    recipe, out = RECIPES["r3-two-stage"], tmp_path / "r3"
    options = {"max_steps": 2, "save_steps": 0}
    results = run_recipe(recipe, tiny_run_options(tiny_model_dir, tiny_data_dir, out, pause_at=1, **options))
    assert [(r.name, r.paused, r.steps) for r in results] == [("stage1-vision", True, 1)]
    assert not (out / "stage1-vision" / "merged").exists()  # a paused stage saves its adapter only
    again = tiny_run_options(tiny_model_dir, tiny_data_dir, out, pause_at=3, resume=True, **options)
    results = run_recipe(recipe, again)
    assert [(r.name, r.paused) for r in results] == [("stage1-vision", False), ("stage2-llm", True)]
    assert (out / "stage1-vision" / "merged").is_dir()


def _trial(recipe: str, tiny_model_dir, tiny_data_dir, out, *flags: str) -> subprocess.CompletedProcess:
    """One search trial of the worker on the CPU, scored on its validation split; it must succeed."""
    trial = ["--cpu", "--val-fraction", "0.2", "--eval-split", "validation", *flags]
    done = subprocess.run(
        worker_argv(recipe, tiny_model_dir, tiny_data_dir, out, *trial),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _answers(out) -> list[str]:
    return [json.loads(line)["text"] for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_a_search_trial_trains_without_its_validation_split_and_is_scored_on_it(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    out = tmp_path / "trial"
    _trial("r1", tiny_model_dir, tiny_data_dir, out, "--lr-scale", "3", "--pause-at", "1")
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "succeeded" and status["paused"]["at"] == 1 and status["stages"] == []
    assert isinstance(status["val_loss"], float)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["split"] == "validation" and metrics["eval"]["val_fraction"] == 0.2
    # a 4-bit trial is scored from its saved adapter on the bf16 base, as every QLoRA evaluation is
    assert metrics["eval"]["in_memory"] is False
    from src.data.dataset import read_raw_records

    validation = read_raw_records(str(tiny_data_dir), "validation", val_fraction=0.2)
    assert metrics["num_images"] == len(validation)


def test_a_trial_scored_in_memory_answers_as_its_saved_adapter_does(tiny_model_dir, tiny_data_dir, tmp_path):
    from src.eval.evaluate import evaluate_output

    out = tmp_path / "trial"
    flags = ("--learning-rate", "3e-3", "--max-steps", "6", "--pause-at", "2")
    done = _trial("r4", tiny_model_dir, tiny_data_dir, out, *flags)
    assert "scoring the trained model in memory" in done.stderr
    assert json.loads((out / "status.json").read_text())["paused"]["at"] == 2  # a rung: step 2 of 6
    in_memory = json.loads((out / "metrics.json").read_text())
    assert in_memory["eval"]["in_memory"] is True
    answers = _answers(out)
    # the same split scored from the saved adapter, loaded onto its base as `recipe-run eval` does
    reloaded = evaluate_output(out, str(tiny_data_dir), split="validation", device="cpu", val_fraction=0.2)
    assert reloaded["eval"]["in_memory"] is False
    assert len(answers) == reloaded["num_images"] > 0 and answers == _answers(out)
    assert (in_memory["f1"], in_memory["precision"]) == (reloaded["f1"], reloaded["precision"])


def test_lr_scale_multiplies_every_stages_own_rate(tiny_model_dir, tiny_data_dir, tmp_path):
    def rates(name: str, scale: float) -> list[float]:
        out = tmp_path / name
        options = {"max_steps": 3, "learning_rate": None, "lr_scale": scale}
        run_recipe(RECIPES["r3-two-stage"], tiny_run_options(tiny_model_dir, tiny_data_dir, out, **options))
        return [json.loads(line)["lr"] for line in (out / "loss_history.jsonl").read_text().splitlines()]

    plain, scaled = rates("plain", 1.0), rates("scaled", 3.0)
    assert len(plain) == 6 and max(plain) > 0  # both stages' steps, each at its own rate
    assert scaled == pytest.approx([3 * rate for rate in plain])
