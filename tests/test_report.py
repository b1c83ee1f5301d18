"""`recipe-run report` on a launch directory with a succeeded and a failed recipe."""

import json

from PIL import Image

from recipe_runner.report import CELL_PX, GRID_COLUMNS, best_per_metric, build_report, write_report


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _launch(tmp_path, tiny_data_dir):
    launch = tmp_path / "20261126-000000-abcd"
    good, bad = launch / "r4-joint", launch / "r1-llm-only"
    image = str(tiny_data_dir / "test" / "000000.png")
    box = {"label": "red circle", "x1": 10, "y1": 10, "x2": 60, "y2": 60}
    _write(
        good / "status.json",
        {
            "status": "succeeded",
            "stages": [{"trainable": {"llm": 100, "vision": 20}}],
            "peak_gpu_mem_gib": 1.5,
        },
    )
    _write(
        good / "metrics.json",
        {
            "precision": 0.75,
            "recall": 0.5,
            "f1": 0.6,
            "map_50": 0.4,
            "map_50_95": 0.2,
            "mean_iou": 0.7,
            "parse_rate": 1.0,
        },
    )
    (good / "loss_history.jsonl").write_text(
        "".join(json.dumps({"stage": "r4-joint", "step": s, "loss": 3.0 / s}) + "\n" for s in (1, 2, 3))
    )
    (good / "predictions.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "image": image,
                    "width": 112,
                    "height": 112,
                    "truths": [box],
                    "predictions": [box],
                    "parsed": True,
                }
            )
            + "\n"
            for _ in range(5)
        )
    )
    _write(bad / "status.json", {"status": "failed", "error": "RuntimeError: boom"})
    _write(
        launch / "base" / "metrics.json",
        {
            "precision": 0.25,
            "recall": 0.1,
            "f1": 0.14,
            "map_50": 0.05,
            "map_50_95": 0.01,
            "mean_iou": 0.3,
            "parse_rate": 0.5,
        },
    )
    jobs = [
        {
            "recipe": "r4-joint",
            "status": "succeeded",
            "output_dir": str(good),
            "duration_s": 36.0,
            "gpu_uuids": ["GPU-a"],
            "final_loss": 1.0,
        },
        {
            "recipe": "r1-llm-only",
            "status": "failed",
            "output_dir": str(bad),
            "duration_s": 3.0,
            "gpu_uuids": ["GPU-b"],
            "final_loss": None,
            "error": "RuntimeError: boom",
        },
    ]
    _write(launch / "summary.json", {"launch_id": launch.name, "jobs": jobs})
    return launch


def test_report_names_the_winner_and_keeps_the_failed_row(tmp_path, tiny_data_dir):
    launch = _launch(tmp_path, tiny_data_dir)
    written = write_report(launch)
    assert {p.name for p in written} == {"report.md", "report.json", "loss.png", "predictions_r4-joint.png"}
    markdown = (launch / "report.md").read_text()
    assert "**Winner by F1 at IoU 0.5: `r4-joint`** (0.600, +0.460 over the zero-shot base)" in markdown
    assert "| `r1-llm-only` | failed |" in markdown and "RuntimeError: boom" in markdown
    assert "| base (zero-shot) |" in markdown and "0.750 (+0.500)" in markdown
    report = json.loads((launch / "report.json").read_text())
    good = report["recipes"][0]
    assert good["trainable_params"] == 120 and good["gpu_hours"] == 0.01
    assert report["best"]["precision"] == "r4-joint"


def test_report_pictures_open_with_the_expected_size(tmp_path, tiny_data_dir):
    launch = _launch(tmp_path, tiny_data_dir)
    write_report(launch)
    with Image.open(launch / "loss.png") as loss:
        assert loss.size == (800, 450)
    with Image.open(launch / "predictions_r4-joint.png") as grid:
        assert grid.size == (GRID_COLUMNS * CELL_PX, 2 * CELL_PX)  # 5 images: two rows of four
        assert grid.getpixel((10 * 2, 10 * 2 + 5)) != (255, 255, 255)  # a box edge was drawn


def test_best_ignores_failed_recipes(tmp_path, tiny_data_dir):
    report = build_report(_launch(tmp_path, tiny_data_dir))
    assert set(report["best"].values()) == {"r4-joint"}
    assert best_per_metric([]) == {}
