"""Qwen3-VL end to end on the CPU: a tiny model in the hub's layout, a COCO data set, every recipe through
`recipe-run`, each adapter holding only its recipe's parts, evaluation in Qwen3-VL's box format, and an
export that loads without PEFT (slow: real training)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_end_to_end import ROOT, launched

pytestmark = pytest.mark.slow


def adapter_pieces(adapter_dir: Path) -> set[str]:
    """The parts an adapter's saved tensors belong to, read from their names (DeepStack apart)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as tensors:
        names = list(tensors.keys())
    assert names and not any(re.search(r"patch_embed|pos_embed|embed_tokens", n) for n in names)
    return {piece_of(name) for name in names}


def changed_pieces(merged_dir: Path, base_dir: Path) -> set[str]:
    """The parts whose weights differ between a merged model and the base it was trained from."""
    from safetensors.torch import load_file

    def weights(model_dir: Path) -> dict:
        tensors: dict = {}
        for shard in sorted(model_dir.glob("*.safetensors")):
            tensors.update(load_file(str(shard)))
        return {re.sub(r"^model\.", "", name): tensor for name, tensor in tensors.items()}

    merged, base = weights(merged_dir), weights(base_dir)
    assert merged.keys() == base.keys()
    changed = {name for name in base if not base[name].equal(merged[name].to(base[name].dtype))}
    return {piece_of(name) for name in changed}


def piece_of(name: str) -> str:
    pieces = {
        "deepstack": r"\.deepstack_merger_list\.",
        "merger": r"\.merger\.",
        "vision": r"visual\.blocks\.",
        "llm": r"language_model\.layers\.",
    }
    return next((p for p, pattern in pieces.items() if re.search(pattern, "." + name)), name)


def test_every_recipe_trains_a_hub_layout_qwen3_vl_on_a_coco_set(tiny_qwen3_vl_dir, tiny_coco_dir, tmp_path):
    coco = tiny_coco_dir
    out = tmp_path / "out"
    _, launch = launched(
        *("--recipes", "all", "--cpu", "--model-id", str(tiny_qwen3_vl_dir), "--dataset", str(coco)),
        *("--max-steps", "2", "--batch-size", "2", "--no-wandb"),
        out=out,
        tmp_path=tmp_path,
        timeout=900,
    )
    summary = json.loads((launch / "summary.json").read_text())
    assert {j["recipe"]: j["status"] for j in summary["jobs"]} == {
        "r1-llm-only": "succeeded",
        "r2-vision-only": "succeeded",
        "r3-two-stage": "succeeded",
        "r4-joint": "succeeded",
    }
    assert adapter_pieces(launch / "r1-llm-only" / "adapter") == {"llm"}
    assert adapter_pieces(launch / "r2-vision-only" / "adapter") == {"vision", "merger", "deepstack"}
    stage1 = launch / "r3-two-stage" / "stage1-vision" / "merged"  # stage 2 trains on top of it
    assert changed_pieces(stage1, tiny_qwen3_vl_dir) == {"vision", "merger", "deepstack"}
    assert adapter_pieces(launch / "r3-two-stage" / "stage2-llm" / "adapter") == {"llm"}
    assert adapter_pieces(launch / "r4-joint" / "adapter") == {"vision", "merger", "deepstack", "llm"}
    for name in ("r1-llm-only", "r2-vision-only", "r3-two-stage", "r4-joint", "base"):
        metrics = json.loads((launch / name / "metrics.json").read_text())
        assert metrics["num_images"] == 8 and metrics["eval"]["family"] == "qwen3_vl"
    report = json.loads((launch / "report.json").read_text())
    assert [r["recipe"] for r in report["recipes"]] == [
        "r1-llm-only",
        "r2-vision-only",
        "r3-two-stage",
        "r4-joint",
    ]

    exported = tmp_path / "exported"
    command = [sys.executable, "-m", "src.export", str(launch), "--recipe", "r3", "--out", str(exported)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and "text_config" in config and "vision_config" in config


def test_qwen3_5_trains_its_hybrid_llm_and_its_tower(tiny_qwen3_5_dir, tiny_data_dir, tmp_path):
    """Qwen3.5: r1's adapter reaches the Gated DeltaNet layers beside full attention; r4's the tower and the
    merger too (Qwen3.5 has no DeepStack)."""
    out = tmp_path / "out"
    _, launch = launched(
        *(
            "--recipes",
            "r1,r4",
            "--cpu",
            "--model-id",
            str(tiny_qwen3_5_dir),
            "--dataset",
            str(tiny_data_dir),
        ),
        *("--max-steps", "2", "--batch-size", "2", "--no-wandb"),
        out=out,
        tmp_path=tmp_path,
        timeout=900,
    )
    assert adapter_pieces(launch / "r1-llm-only" / "adapter") == {"llm"}
    assert adapter_pieces(launch / "r4-joint" / "adapter") == {"vision", "merger", "llm"}
    from safetensors import safe_open

    with safe_open(str(launch / "r1-llm-only" / "adapter" / "adapter_model.safetensors"), "pt") as tensors:
        names = list(tensors.keys())
    assert any(".linear_attn.in_proj_qkv." in n for n in names)
    assert any(".self_attn.q_proj." in n for n in names)
    metrics = json.loads((launch / "r4-joint" / "metrics.json").read_text())
    assert metrics["eval"]["family"] == "qwen3_5"
