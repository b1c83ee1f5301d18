"""The training core on a real GPU: bf16 LoRA, 4-bit QLoRA, device identity. Marked `gpu`.

Run on the GPU machine: `python -m pytest tests/gpu -m gpu` (see docs/benchmarks.md for the setup).
"""

import json
import subprocess
import sys

import pytest

from src.recipes import RECIPES
from src.training.levers import GPU_LOGGING_STEPS
from tests.conftest import REPO, tiny_run_options, worker_argv

pytestmark = pytest.mark.gpu


def _options(tiny_model_dir, tiny_data_dir, out):
    return tiny_run_options(tiny_model_dir, tiny_data_dir, out, device="cuda")


@pytest.mark.parametrize("key", ["r1-llm-only", "r4-joint"])
def test_recipe_trains_on_cuda(key, tiny_model_dir, tiny_data_dir, tmp_path):
    from src.training.run import run_recipe

    (result,) = run_recipe(RECIPES[key], _options(tiny_model_dir, tiny_data_dir, tmp_path))
    assert result.steps == 3 and result.final_loss is not None
    history = [json.loads(line) for line in (tmp_path / "loss_history.jsonl").read_text().splitlines()]
    # On a GPU the loss is read back every GPU_LOGGING_STEPS steps and at the last (levers.py): one row.
    assert GPU_LOGGING_STEPS > 3 and [row["step"] for row in history] == [3]


def test_4bit_on_cuda_keeps_vision_in_bf16(tiny_model_dir):
    import torch

    from src.models.loader import count_quantized_layers, load_quantized_model

    model = load_quantized_model(str(tiny_model_dir), "cuda")
    assert set(count_quantized_layers(model)) == {"llm"}
    assert model.model.visual.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert next(model.parameters()).device.type == "cuda"


def test_worker_logs_the_device_it_sees(tiny_model_dir, tiny_data_dir, tmp_path):
    import torch

    out = tmp_path / "r3"
    command = worker_argv("r3", tiny_model_dir, tiny_data_dir, out, "--gpu", "0")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["device"]["name"] == torch.cuda.get_device_name(0)
    assert status["device"]["uuid"].startswith("GPU-")
    assert [s["name"] for s in status["stages"]] == ["stage1-vision", "stage2-llm"]


def test_bench_on_cuda_measures_memory_utilisation_and_mfu(tiny_fixtures, tmp_path):
    """The benchmark's GPU-only columns are filled on a GPU (the CPU smoke run leaves them empty)."""
    import sys

    model_dir, data_dir = tiny_fixtures
    out = tmp_path / "out"
    argv = ["--model-id", str(model_dir), "--dataset", str(data_dir), "--recipes", "r1,r4"]
    argv += [
        "--variants",
        "plain,fast",
        "--steps",
        "3",
        "--warmup",
        "2",
        "--work",
        str(tmp_path),
        "--out",
        str(out),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "src.bench", *argv], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["environment"]["bf16_peak_tflops"] > 50
    for row in report["rows"]:
        assert row["peak_gib"] > 0 and row["mfu_pct"] is not None and row["gpu_util_pct"] is not None


@pytest.mark.parametrize("key", ["r1-llm-only", "r3-two-stage", "r4-joint"])
def test_qwen3_vl_recipe_trains_on_cuda(key, tiny_qwen3_vl_dir, tiny_coco_dir, tmp_path):
    """Qwen3-VL on a GPU: r1's 4-bit LLM with the tower and every merger (DeepStack's too) kept bf16, r3's
    merge between stages, r4 compiled with one attention call a vision block."""
    import torch

    from src.models.loader import count_quantized_layers, load_quantized_model
    from src.training.run import run_recipe

    options = tiny_run_options(tiny_qwen3_vl_dir, tiny_coco_dir, tmp_path, device="cuda")
    results = run_recipe(RECIPES[key], options)
    assert all(r.final_loss is not None for r in results)
    if key == "r1-llm-only":
        model = load_quantized_model(str(tiny_qwen3_vl_dir), "cuda")
        assert set(count_quantized_layers(model)) == {"llm"}
        assert model.model.visual.deepstack_merger_list[0].linear_fc1.weight.dtype == torch.bfloat16


def test_a_compiled_trial_is_scored_in_memory_like_its_saved_adapter(tiny_model_dir, tiny_data_dir, tmp_path):
    """A search trial compiled on a GPU (regions, one vision attention call a block, adapter inputs uncast)
    is scored with the model it trained, made eager and merged, and answers as its saved adapter does."""
    from src.eval.evaluate import evaluate_output

    out = tmp_path / "trial"
    trial = [
        "--gpu",
        "0",
        "--compile",
        "on",
        "--val-fraction",
        "0.2",
        "--eval-split",
        "validation",
        "--max-steps",
        "6",
    ]
    command = [*worker_argv("r4", tiny_model_dir, tiny_data_dir, out, *trial), "--pause-at", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    in_memory = json.loads((out / "metrics.json").read_text())
    assert in_memory["eval"]["in_memory"] is True and in_memory["eval"]["device"] == "cuda"
    answers = [json.loads(line)["text"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    reloaded = evaluate_output(out, str(tiny_data_dir), split="validation", device="cuda", val_fraction=0.2)
    again = [json.loads(line)["text"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(answers) == len(again) > 0
    # The trained model keeps training's vision attention path (varlen, bf16 kernels of another shape), so
    # a near-tie may break differently; the tiny model's trained answers are far from ties.
    same = sum(a == b for a, b in zip(answers, again, strict=True))
    assert same >= 0.75 * len(answers), (same, len(answers))
    assert in_memory["parse_rate"] == reloaded["parse_rate"]


CAP_PROBE = """
import torch
from src.utils.gpu import cap_gpu_memory
budget, fraction = cap_gpu_memory("cuda")
within = torch.empty(budget // 2 * 2**20, dtype=torch.uint8, device="cuda")
try:
    beyond = torch.empty(budget * 2**20, dtype=torch.uint8, device="cuda")
except torch.OutOfMemoryError:
    print("out of memory at the cap")
print("reserved MiB", torch.cuda.max_memory_reserved() // 2**20)
"""


def test_a_packed_job_runs_out_of_memory_at_its_reservation_not_its_neighbours():
    """The cap on a real allocator, with the launcher's allocator setting: half the reservation fits, the
    other half more does not, though the GPU has room (a process of its own: the cap stays for its life)."""
    import os

    env = {
        **os.environ,
        "RECIPE_RUNNER_GPU_BUDGET_MIB": "2048",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    }
    done = subprocess.run(
        [sys.executable, "-c", CAP_PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "out of memory at the cap" in lines
    reserved = int(lines[-1].split()[-1])
    assert 1024 <= reserved <= 2048
