"""A recipe of your own end to end: `recipe-run --recipes-file examples/r5.toml --recipes r5` on the CPU with
the real worker and the tiny model (slow: real training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.integration.test_end_to_end import ROOT, launched


@pytest.mark.slow
def test_r5_from_the_example_file_trains_and_saves_its_merger(
    tiny_model_dir, tiny_data_dir, tmp_path
) -> None:
    out = tmp_path / "out"
    _, launch = launched(
        *("--recipes-file", str(ROOT / "examples" / "r5.toml"), "--recipes", "r5", "--cpu"),
        *("--model-id", str(tiny_model_dir), "--dataset", str(tiny_data_dir)),
        *("--max-steps", "2", "--batch-size", "2", "--no-wandb", "--skip-eval"),
        out=out,
        tmp_path=tmp_path,
        timeout=300,
    )
    (job,) = json.loads((launch / "summary.json").read_text())["jobs"]
    assert (job["recipe"], job["status"]) == ("r5-llm-merger", "succeeded")
    assert job["argv"][job["argv"].index("--recipes-file") + 1] == str(ROOT / "examples" / "r5.toml")
    assert isinstance(job["final_loss"], float)
    with safe_open(Path(job["output"]) / "adapter_model.safetensors", "pt") as adapter:
        names = list(adapter.keys())
    assert any(".visual.merger.mlp.0.weight" in name for name in names)  # the fully trained merger
    assert any("language_model" in name and "lora_B" in name for name in names)
    assert not any(".visual.blocks." in name for name in names)
