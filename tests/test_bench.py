"""The benchmark on the tiny shape (CPU): it runs the real training path and the plain loop,
writes its JSON and table, and refuses bad flags. CPU timings here are no speed claim."""

import json
import subprocess
import sys

import pytest

from src.bench.__main__ import LADDER, VARIANTS, build_parser, check_args, render_table, variants


def test_tiny_shape_runs_the_core_and_the_plain_loop(tmp_path, tiny_fixtures):
    out = tmp_path / "out"
    argv = ["--cpu", "--recipes", "r1,r3", "--variants", "plain,fast", "--steps", "2", "--warmup", "1"]
    model_dir, data_dir = tiny_fixtures
    argv += [
        "--model-id",
        str(model_dir),
        "--dataset",
        str(data_dir),
        "--work",
        str(tmp_path),
        "--out",
        str(out),
    ]
    done = subprocess.run([sys.executable, "-m", "src.bench", *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((out / "bench.json").read_text())
    rows = report["rows"]
    labels = [(r["recipe"], r["variant"]) for r in rows]
    assert labels == [
        (recipe, variant)
        for recipe in ("r1-llm-only", "r3-two-stage/stage1-vision", "r3-two-stage/stage2-llm")
        for variant in ("plain", "fast")
    ]
    for row in rows:
        assert row["steps_measured"] == 2
        assert row["step_s"] > 0 and row["tokens_s"] > 0
        assert row["tokens_per_step"] > 4 * 10  # every sample has an image and a prompt
        assert row["predicted_gib"] > 0 and row["step_flops"] > 0
    # r3's first stage trains the vision tower, so it must cost more FLOPs than its LLM-only second stage.
    flops = {r["recipe"]: r["step_flops"] for r in rows}
    assert flops["r3-two-stage/stage1-vision"] > flops["r3-two-stage/stage2-llm"]
    table = (out / "bench.md").read_text()
    assert "| r1-llm-only | fast |" in table and "x plain" in table


def test_the_ladder_switches_one_lever_on_at_a_time():
    from dataclasses import fields

    from src.training.run import RunOptions

    defaults = {f.name: f.default for f in fields(RunOptions)}
    settings = [{**defaults, **VARIANTS[name]} for name in LADDER]
    changed = [{k for k in a if a[k] != b[k]} for a, b in zip(settings, settings[1:], strict=False)]
    assert all(len(keys) == 1 for keys in changed), changed
    assert settings[-1] == defaults  # the last rung is the worker's own default path
    assert variants(build_parser().parse_args(["--shape", "tiny", "--ladder"])) == ["plain", *LADDER]


@pytest.mark.parametrize(
    "argv, wanted",
    [
        ([], "give --shape"),
        (["--shape", "tiny", "--variants", "plain,turbo"], "--variants: unknown ['turbo']"),
        (["--shape", "tiny", "--recipes", "r9"], "--recipes"),
        (["--shape", "tiny", "--steps", "0"], "--steps 0"),
    ],
)
def test_bad_flags_are_named(argv, wanted):
    problems = check_args(build_parser().parse_args(argv))
    assert any(wanted in p for p in problems), problems


def test_recipe_run_bench_exits_2_on_bad_flags_before_loading_anything(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipe_runner",
            "bench",
            "--shape",
            "tiny",
            "--steps",
            "0",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--steps 0" in done.stderr
    assert not (tmp_path / "o").exists()


def test_table_compares_with_the_plain_row_of_the_same_recipe():
    row = {
        "shape": "7b",
        "recipe": "r4-joint",
        "checkpointing": True,
        "step_s": 0.5,
        "peak_gib": 20.0,
        "predicted_gib": 19.0,
        "mfu_pct": 30.0,
        "gpu_util_pct": 99.0,
    }
    report = {
        "environment": {"device": {"name": "H200"}, "bf16_peak_tflops": 700, "date": "d", "versions": {}},
        "rows": [
            {**row, "variant": "plain", "tokens_s": 1000.0},
            {**row, "variant": "fast", "tokens_s": 2500.0},
        ],
    }
    assert "| 7b | r4-joint | fast | on | 0.5 | 2500.0 | 2.50 |" in render_table(report)
