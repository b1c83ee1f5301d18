"""The training core on a real GPU: bf16 LoRA, 4-bit QLoRA, device identity. Marked `gpu`.

Run on the GPU machine: `python -m pytest tests/gpu -m gpu` (see docs/benchmarks.md for the setup).
"""

import json
import subprocess

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
