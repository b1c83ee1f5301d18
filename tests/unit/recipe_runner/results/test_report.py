"""`recipe-run report` on a launch directory with a succeeded and a failed recipe."""

import json

import pytest
from PIL import Image

from recipe_runner.results.report import best_per_metric, build_report, write_report
from recipe_runner.results.report_plots import CELL_PX, GRID_COLUMNS


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


def test_a_recipe_whose_evaluation_failed_is_named_beside_the_verdict(tmp_path, tiny_data_dir):
    # A packed r2 once trained, then ran out of memory loading its evaluation: no metrics.json, and the
    # winner was chosen among the others without a word about it.
    launch = _launch(tmp_path, tiny_data_dir)
    summary = json.loads((launch / "summary.json").read_text())
    unscored = launch / "r2-vision-only"
    error = "OutOfMemoryError: CUDA out of memory. Tried to allocate 13.71 GiB"
    _write(unscored / "status.json", {"status": "succeeded", "eval": {"status": "failed", "error": error}})
    summary["jobs"].append(
        {"recipe": "r2-vision-only", "status": "succeeded", "output_dir": str(unscored), "duration_s": 9.0}
    )
    _write(launch / "summary.json", summary)
    write_report(launch)
    markdown = (launch / "report.md").read_text()
    assert (
        f"**Not in the verdict: `r2-vision-only`** trained, but its evaluation failed ({error});" in markdown
    )
    assert f"`recipe-run eval {unscored}` scores it again" in markdown
    assert "Not in the verdict: `r4-joint`" not in markdown and "Not in the verdict: `r1" not in markdown
    report = json.loads((launch / "report.json").read_text())
    assert [row["eval_error"] for row in report["recipes"]] == [None, None, error]


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


CAT = {"label": "cat", "x1": 10, "y1": 10, "x2": 60, "y2": 60}  # 2,500 px²: medium
DOG = {"label": "dog", "x1": 0, "y1": 0, "x2": 20, "y2": 20}  # 400 px²: small
STRAY = {"label": "dog", "x1": 80, "y1": 80, "x2": 100, "y2": 100}


def _predictions(out, image, images: int, dog_found_every: int | None):
    """predictions.jsonl: a cat and a dog per image; the cat always found, the dog every Nth image."""
    lines = []
    for i in range(images):
        found = dog_found_every is not None and i % dog_found_every == 0
        predictions = [CAT, DOG if found else STRAY] if dog_found_every is not None else []
        lines.append(
            {"image": f"{image}#{i}", "truths": [CAT, DOG], "predictions": predictions, "parsed": True}
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _contest(tmp_path, r1_dog_every: int, images: int = 40, seeds: tuple = (None,)):
    """A launch of r4 (finds everything) against r1 (misses dogs) and a base that answers nothing."""
    launch = tmp_path / "launch"
    jobs = []
    for seed in seeds:
        for recipe, every in (("r1-llm-only", r1_dog_every), ("r4-joint", 1)):
            name = recipe if seed is None else f"{recipe}-seed{seed}"
            _predictions(launch / name, "img.png", images, every)
            _write(launch / name / "status.json", {"status": "succeeded"})
            _write(launch / name / "metrics.json", {"f1": 1.0 if every == 1 else 0.75, "num_images": images})
            jobs.append(
                {
                    "recipe": recipe,
                    "name": name,
                    "seed": seed,
                    "status": "succeeded",
                    "output_dir": str(launch / name),
                }
            )
    _predictions(launch / "base", "img.png", images, None)
    _write(launch / "base" / "metrics.json", {"f1": 0.0, "eval": {"dataset": "data"}})
    _write(launch / "summary.json", {"launch_id": "x", "jobs": jobs})
    return launch


def _markdown(launch) -> str:
    from recipe_runner.results.report_markdown import render_markdown

    return render_markdown(build_report(launch), [])


def test_a_clear_winner_is_named_with_its_paired_interval(tmp_path):
    launch = _contest(tmp_path, r1_dog_every=4)
    report = build_report(launch)
    (verdict,) = report["verdicts"]
    assert verdict["winner"] == "r4-joint" and verdict["clear"]
    runner_up, base = (c["difference"]["f1"] for c in verdict["comparisons"])
    # r1: tp 40 cats + 10 dogs of 80 truths and 80 predictions: F1 0.625; base: F1 0.
    assert runner_up["difference"] == pytest.approx(0.375) and runner_up["low"] > 0
    assert base["difference"] == pytest.approx(1.0) and base["significant"]
    assert report["recipes"][1]["intervals"]["f1"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    markdown = _markdown(launch)
    assert "**The winner is clear:** `r4-joint` beats `r1-llm-only` by +0.375 F1 (95% CI [+0." in markdown
    assert "and beats the zero-shot base by +1.000 F1 (95% CI [+1.000, +1.000])" in markdown
    assert "paired bootstrap over 40 test images, 1000 resamples." in markdown
    assert "| `r4-joint` − `r1-llm-only` | " in markdown and "| `r4-joint` − base | " in markdown


def test_identical_recipes_give_no_clear_winner(tmp_path):
    launch = _contest(tmp_path, r1_dog_every=1)
    (verdict,) = build_report(launch)["verdicts"]
    assert not verdict["clear"] and verdict["winner"] == "r1-llm-only"  # a tie goes to launch order
    d = verdict["comparisons"][0]["difference"]["f1"]
    assert (d["difference"], d["low"], d["high"], d["significant"]) == (0.0, 0.0, 0.0, False)
    markdown = _markdown(launch)
    assert "**The winner is not clear:**" in markdown
    assert (
        "`r1-llm-only` shows no significant difference from `r4-joint` (+0.000 F1, 95% CI [+0.000, +0.000]"
        " includes 0)" in markdown
    )


def test_breakdown_by_label_and_size_shows_where_a_recipe_wins(tmp_path):
    launch = _contest(tmp_path, r1_dog_every=4)
    report = build_report(launch)
    r1 = report["recipes"][0]
    assert r1["per_label"]["cat"]["f1"] == 1.0 and r1["per_label"]["dog"]["f1"] == pytest.approx(0.25)
    assert r1["per_size"]["medium"]["f1"] == 1.0 and r1["per_size"]["small"]["recall"] == pytest.approx(0.25)
    markdown = _markdown(launch)
    assert "| model | cat (n=40) | dog (n=40) | small (n=40) | medium (n=40) | large (n=0) |" in markdown
    assert "| `r1-llm-only` | 1.000 | 0.250 | 0.250 | 1.000 | - |" in markdown


def test_seed_sweeps_show_the_seed_spread_beside_the_image_interval(tmp_path):
    launch = _contest(tmp_path, r1_dog_every=4, seeds=(0, 1))
    report = build_report(launch)
    groups = {g["recipe"]: g for g in report["over_seeds"]}
    assert groups["r1-llm-only"]["intervals"]["f1"]["value"] == pytest.approx(0.625)
    (verdict,) = report["verdicts"]
    assert verdict["over_seeds"] and verdict["winner"] == "r4-joint" and verdict["seeds"] == 2
    markdown = _markdown(launch)
    assert "| `r1-llm-only` | - | 2/2 (0,1) | " in markdown and "0.750 ± 0.000 [" in markdown
    assert "`r4-joint` (mean over seeds)" in markdown


def test_without_predictions_the_report_has_no_intervals_but_stands(tmp_path, tiny_data_dir):
    launch = _launch(tmp_path, tiny_data_dir)
    (launch / "r4-joint" / "predictions.jsonl").write_text("not json\n")
    report = build_report(launch)
    assert report["verdicts"] == [] and report["recipes"][0]["intervals"] == {}
    assert "Winner by F1" in _markdown(launch)


def test_a_packed_launch_shows_each_peak_beside_its_reservation_and_flags_the_excess(tmp_path, tiny_data_dir):
    launch = _launch(tmp_path, tiny_data_dir)
    write_report(launch)
    assert "held / reserved" not in (launch / "report.md").read_text()  # unpacked (or CPU): no such column
    summary = json.loads((launch / "summary.json").read_text())
    good, bad = summary["jobs"]
    good.update(reservation_gib=40.0, peak_gpu_reserved_gib=41.3, over_reservation_gib=1.3)
    bad.update(reservation_gib=20.0, peak_gpu_reserved_gib=None, over_reservation_gib=None)
    _write(launch / "summary.json", summary)
    write_report(launch)
    markdown = (launch / "report.md").read_text()
    assert "GPU GiB held / reserved" in markdown
    assert "| 1.50 | 41.30 / 40.00 (**1.30 over**) | 1.0000 |" in markdown  # after the allocated peak
    assert "| - / 20.00 | - |" in markdown
    base = next(line for line in markdown.splitlines() if line.startswith("| base (zero-shot)"))
    head = next(line for line in markdown.splitlines() if line.startswith("| recipe |"))
    assert base.count("|") == head.count("|")  # the base row keeps the table's shape
    rows = json.loads((launch / "report.json").read_text())["recipes"]
    assert (
        rows[0]["reservation_gib"],
        rows[0]["peak_gpu_reserved_gib"],
        rows[0]["over_reservation_gib"],
    ) == (
        40.0,
        41.3,
        1.3,
    )
