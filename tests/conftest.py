"""Shared fixtures: the offline tiny Qwen2-VL and shapes data set, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped visibly (with a reason in the summary) where CUDA is absent."""
    if not any("gpu" in item.keywords for item in items):
        return
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: see docs/benchmarks.md)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_fixtures(tmp_path_factory) -> tuple[Path, Path]:
    """(model_dir, data_dir) of the offline fixtures; reuses $RECIPE_RUNNER_FIXTURES if set."""
    from src.fixtures import build_test_fixtures

    root = Path(os.environ.get("RECIPE_RUNNER_FIXTURES") or tmp_path_factory.mktemp("fixtures"))
    return build_test_fixtures(root, train=16, test=8)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_fixtures) -> Path:
    return tiny_fixtures[0]


@pytest.fixture(scope="session")
def tiny_data_dir(tiny_fixtures) -> Path:
    return tiny_fixtures[1]


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from src.models.loader import load_processor

    return load_processor(str(tiny_model_dir))


def worker_argv(recipe: str, model_dir, data_dir, out, *extra: str) -> list[str]:
    """The worker's command line as the tests run it: a few small steps, no W&B."""
    return [
        sys.executable,
        str(REPO / "scripts" / "train_recipe.py"),
        "--recipe",
        recipe,
        "--model-id",
        str(model_dir),
        "--dataset",
        str(data_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--no-wandb",
        *extra,
    ]


def tiny_run_options(model_dir, data_dir, out, **overrides):
    """RunOptions for a few quick steps on the tiny fixtures; tests override what they vary."""
    from src.training.run import RunOptions

    settings = {"device": "cpu", "max_steps": 3, "batch_size": 2, "learning_rate": 1e-2, **overrides}
    return RunOptions(model_id=str(model_dir), dataset=str(data_dir), output_dir=out, **settings)


def exact_lora(model):
    """`model` ready for exact comparisons of gradients: lora_B off its zero init (which would leave every
    lora_A gradient zero) and dropout off; returns it."""
    import torch

    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def tiny_batch(model_dir, data_dir, device: str, samples: int = 3) -> dict:
    """The collated first `samples` training samples of the tiny data set, on `device`."""
    from src.data.collators import AssistantOnlyCollator
    from src.data.dataset import build_dataset
    from src.models.loader import load_processor

    processor = load_processor(str(model_dir))
    dataset, _ = build_dataset(str(data_dir), "train", "qwen2_vl", processor)
    batch = AssistantOnlyCollator(processor)([dataset[i] for i in range(samples)])
    return {key: value.to(device) for key, value in batch.items()}


def loss_and_grads(model, batch) -> tuple[float, dict]:
    """One forward and backward from zeroed gradients: the loss and a copy of every gradient (fp32)."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_qwen2_5_vl():
    """A random one-layer Qwen2.5-VL (windowed vision tower), built in memory: the other family."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }
    vision = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 4,
        "fullatt_block_indexes": [0],
    }
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
