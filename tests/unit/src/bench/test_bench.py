"""The benchmark on the tiny shape (CPU): it runs the real training path and the plain loop,
writes its JSON and table, and refuses bad flags. CPU timings here are no speed claim."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from src.bench.__main__ import LADDER, build_parser, check_args, variants
from src.bench.end_to_end import split_phases
from src.bench.measure import gpu_idle_share
from src.bench.rows import VARIANTS, plain_search_order
from src.bench.tables import combine_rounds, render_table
from src.contract.progress import format_event

NUMBER_COLUMNS = ("step_s", "tokens_s", "samples_s", "first_step_s", "predicted_gib", "step_flops", "wall_s")


def test_tiny_shape_runs_the_core_and_the_plain_loop_in_rounds(tmp_path, tiny_fixtures):
    out = tmp_path / "out"
    argv = ["--cpu", "--recipes", "r1,r3", "--variants", "plain,fast", "--steps", "2", "--warmup", "1"]
    argv += ["--samples-per-step", "4", "--profile", "fast", "--rounds", "2"]
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
    table = (out / "bench.md").read_text()
    for row in rows:
        rounds = row["rounds"]
        assert len(rounds) == 2 and all(found["steps_measured"] == 2 for found in rounds)
        assert all((found["recipe"], found["variant"]) == (row["recipe"], row["variant"]) for found in rounds)
        # The row's step time is the median of its rounds', and what derives from it follows it.
        assert row["step_s"] == pytest.approx(
            statistics.median(found["step_s"] for found in rounds), abs=1e-4
        )
        assert row["tokens_s"] == pytest.approx(row["tokens_per_step"] / row["step_s"], rel=0.01)
        times = " / ".join(str(found["step_s"]) for found in rounds)
        assert f"| {row['recipe']} | {row['variant']} | " in table
        assert f"| {row['step_s']} | {times} | {row['tokens_s']} | {row['samples_s']} |" in table
        for column in NUMBER_COLUMNS:
            assert isinstance(row[column], (int, float)) and row[column] > 0, (column, row)
        assert row["micro_batch"] * row["grad_accum"] == row["samples_per_step"] == 4
        assert row["tokens_per_step"] > 4 * 10  # every sample has an image and a prompt
        assert row["samples_s"] == pytest.approx(4 / row["step_s"], rel=0.01)
        assert row["compile"] is False and row["compile_s"] is None and row["recompiles"] is None
    # On the CPU nothing runs out of memory: the bare loop's best setting is one micro-batch, no recompute.
    plain = [r for r in rows if r["variant"] == "plain"]
    assert all((r["micro_batch"], r["checkpointing"], r["tried"]) == (4, False, []) for r in plain)
    assert (out / "profile-tiny-qwen2-vl-r1-llm-only-fast.txt").read_text().count("aten::") >= 10
    # r3's first stage trains the vision tower, so it must cost more FLOPs than its LLM-only second stage.
    flops = {r["recipe"]: r["step_flops"] for r in rows}
    assert flops["r3-two-stage/stage1-vision"] > flops["r3-two-stage/stage2-llm"]
    assert "| r1-llm-only | fast | 4x1 |" in table and "x plain" in table and "samples/s" in table


def test_the_ladder_switches_one_lever_on_at_a_time():
    from dataclasses import fields

    from src.training.options import RunOptions

    defaults = {f.name: f.default for f in fields(RunOptions)}
    settings = [{**defaults, **VARIANTS[name]} for name in LADDER]
    changed = [{k for k in a if a[k] != b[k]} for a, b in zip(settings, settings[1:], strict=False)]
    assert all(len(keys) == 1 for keys in changed), changed
    assert settings[-1] == defaults  # the last rung is the worker's own default path
    ladder = variants(build_parser().parse_args(["--shape", "tiny", "--ladder"]))
    assert ladder == ["plain", "plain-recompute", *LADDER, "fast+compile"]


@pytest.mark.slow
def test_mixed_image_sizes_run_the_bare_loop_in_file_order_beside_the_core(tmp_path):
    """`--image-sizes mixed`: COCO's sizes in turn, recorded in bench.json, bench.md and synthetic.json; the
    bare loop's micro-batches take the files in order, so they mix sizes (the core groups them on GPUs)."""
    from src.fixtures.synthetic import COCO_SIZES, SETTINGS_FILE

    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--shape", "tiny", "--cpu", "--image-sizes", "mixed", "--steps", "2", "--warmup", "1"]
    argv += ["--recipes", "r4", "--variants", "plain,fast,fast-ungrouped", "--samples-per-step", "4"]
    argv += ["--work", str(work), "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "src.bench", *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((out / "bench.json").read_text())
    assert report["environment"]["image_sizes"] == "mixed"
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["plain", "fast", "fast-ungrouped"] and all(r["step_s"] for r in rows.values())
    coco = {f"{w}x{h}" for w, h in COCO_SIZES}
    assert all(set(row["image_sizes"]) == coco for row in rows.values())
    assert rows["plain"]["uniform_micro_batches_pct"] == 0.0  # file order: every micro-batch mixes sizes
    assert all(row["patches_per_sample"] > 0 for row in rows.values())
    assert "Images: mixed (tiny: 640x480 x " in (out / "bench.md").read_text()
    (data,) = work.glob("data-coco-sizes-*")
    assert json.loads((data / SETTINGS_FILE).read_text())["sizes"] == [list(size) for size in COCO_SIZES]


def test_a_rows_tokens_come_from_the_images_its_timed_steps_took():
    """The grouped order takes a window's largest images first: the row counts those, not the data's mean."""
    from types import SimpleNamespace

    from src.bench.targets import timed_stats, uniform_pct

    stats = {"tokens": 100.0 + 1200 / 4, "patches": 1200.0, "labels": 20.0}  # 100 text tokens a sample
    target = SimpleNamespace(stats=stats, patch_keys=[1936, 1936, 936, 936])
    assert timed_stats(target, [0, 1]) == {"tokens": 100 + 1936 / 4, "patches": 1936, "labels": 20.0}
    assert timed_stats(target, None) is stats
    assert uniform_pct(target.patch_keys, [0, 1, 2, 3], 2) == 100.0
    assert uniform_pct(target.patch_keys, [0, 2, 1, 3], 2) == 0.0


def test_mixed_sizes_bring_enough_images_for_the_samplers_longest_windows():
    from types import SimpleNamespace

    from src.bench.targets import synthetic_images
    from src.training.size_groups import WINDOW_STEPS

    one = SimpleNamespace(samples_per_step=16, warmup=3, steps=8, image_sizes="one")
    mixed = SimpleNamespace(**{**vars(one), "image_sizes": "mixed"})
    assert synthetic_images(mixed) == 4 * WINDOW_STEPS * 16 > synthetic_images(one)


@pytest.mark.parametrize(
    "argv, wanted",
    [
        ([], "give --shape"),
        (["--model-id", "m", "--dataset", "d", "--image-sizes", "mixed"], "--image-sizes sets the synthetic"),
        (["--shape", "tiny", "--variants", "plain,turbo"], "--variants: unknown ['turbo']"),
        (["--shape", "tiny", "--recipes", "r9"], "--recipes"),
        (["--shape", "tiny", "--steps", "0"], "--steps 0"),
        (["--shape", "tiny", "--samples-per-step", "0"], "--samples-per-step 0"),
        (["--shape", "tiny", "--profile", "turbo"], "--profile: unknown ['turbo']"),
        (["--shape", "tiny", "--rounds", "0"], "--rounds 0: must be at least 1"),
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


def test_rounds_below_one_exit_2_before_anything_is_written(tmp_path):
    work, out = tmp_path / "w", tmp_path / "o"
    argv = ["--shape", "tiny", "--cpu", "--rounds", "0", "--work", str(work), "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "src.bench", *argv], capture_output=True, text=True)
    assert done.returncode == 2 and "--rounds 0: must be at least 1" in done.stderr, done.stderr
    assert not work.exists() and not out.exists()


def _row(variant: str, tokens_s: float, step_s: float = 0.5, **extra) -> dict:
    row = {
        "shape": "7b",
        "recipe": "r4-joint",
        "variant": variant,
        "micro_batch": 8,
        "grad_accum": 2,
        "checkpointing": False,
        "compile": False,
        "step_s": step_s,
        "tokens_s": tokens_s,
        "samples_s": 32.0,
        "peak_gib": 20.0,
        "predicted_gib": 19.0,
        "mfu_pct": 30.0,
        "gpu_util_pct": 99.0,
        "compile_s": None,
        "recompiles": None,
        "predicted_step_s": None,
    }
    return {**row, **extra}


def _report(rows: list[dict], end_to_end=()) -> dict:
    env = {"device": {"name": "H200"}, "bf16_peak_tflops": 700, "date": "d", "versions": {}}
    return {"environment": env, "rows": rows, "end_to_end": list(end_to_end)}


def test_table_compares_with_the_plain_row_of_the_same_recipe():
    fast = _row(
        "fast+compile", 2500.0, compile=True, compile_s=40.1, recompiles=3, uniform_micro_batches_pct=93.8
    )
    table = render_table(_report([_row("plain", 1000.0), fast]))
    assert "| 7b | r4-joint | fast+compile | 8x2 | off | on | 0.5 | - | 2500.0 | 32.0 | 2.50 |" in table
    assert table.rstrip().endswith("| 40.1 | 3 | 93.8 |")  # the share of micro-batches of one image size


def test_rounds_make_one_row_at_the_median_step_time_and_the_worst_peak():
    env = _report([])["environment"]
    extra = {"tokens_per_step": 8000, "samples_per_step": 16, "step_flops": 7e13, "wall_s": 30.0}
    rounds = [
        _row("fast", 16000.0, step_s=0.5, peak_gib=20.0, **extra),
        _row("fast", 10000.0, step_s=0.8, peak_gib=21.5, **extra),
        _row("fast", 20000.0, step_s=0.4, peak_gib=19.0, **extra),
    ]
    row = combine_rounds(rounds, env)
    assert (row["step_s"], row["tokens_s"], row["samples_s"]) == (0.5, 16000.0, 32.0)
    assert row["mfu_pct"] == 20.0  # 7e13 FLOPs in 0.5 s of a 700 TFLOP/s card
    assert (row["peak_gib"], row["wall_s"], row["rounds"]) == (21.5, 90.0, rounds)
    even = combine_rounds(rounds[:2], env)  # two rounds: the mean of the middle two
    assert (even["step_s"], even["tokens_s"]) == (0.65, round(8000 / 0.65, 1))
    assert "| 0.5 | 0.5 / 0.8 / 0.4 | 16000.0 | 32.0 |" in render_table(_report([row]))
    one = combine_rounds(rounds[:1], env)  # one round: the row as measured, its rounding untouched
    assert {k: v for k, v in one.items() if k != "rounds"} == rounds[0]
    # A round at another setting (the bare loop's search) or skipped is shown as such.
    rounds[1] = {**rounds[1], "micro_batch": 4, "grad_accum": 4}
    rounds[2] = {"shape": "7b", "recipe": "r4-joint", "variant": "fast", "skipped": "out of memory"}
    assert "| 0.65 | 0.5 / 0.8 (4x4) / skipped |" in render_table(_report([combine_rounds(rounds, env)]))


def test_candidates_table_says_whether_the_planners_choice_is_within_5_percent_of_the_fastest():
    rows = [
        _row("cand1", 1000.0, step_s=0.53, predicted_step_s=0.5),
        _row("cand2", 1100.0, step_s=0.50, predicted_step_s=0.6),
        _row("cand3", 900.0, step_s=0.60, predicted_step_s=0.7),
    ]
    assert "6.0% slower than the fastest measured (cand2): NOT within 5%" in render_table(_report(rows))
    rows[0]["step_s"] = 0.51
    assert "2.0% slower than the fastest measured (cand2): within 5%" in render_table(_report(rows))


def test_plain_search_tries_no_recompute_first_from_the_largest_micro_batch_down():
    order = [(s.micro_batch, s.grad_accum, s.checkpointing) for s in plain_search_order(8, (False, True))]
    assert order[:4] == [(8, 1, False), (4, 2, False), (2, 4, False), (1, 8, False)]
    assert order[4:] == [(8, 1, True), (4, 2, True), (2, 4, True), (1, 8, True)]


def test_plain_row_falls_back_to_a_smaller_micro_batch_on_cuda_oom(monkeypatch, tiny_fixtures, tmp_path):
    import torch

    from src.bench import __main__ as bench
    from src.bench import plain, rows

    tried = []

    def train_or_oom(model, batches, steps, lr, timer, device, grad_accum, checkpointing):
        tried.append((len(batches[0]["input_ids"]), grad_accum, checkpointing))
        if len(batches[0]["input_ids"]) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        timer.begin()
        for _ in range(steps):
            timer.step_done()

    monkeypatch.setattr(plain, "train_plain", train_or_oom)
    target = bench.Target.load("tiny", *tiny_fixtures)
    args = build_parser().parse_args(["--shape", "tiny", "--samples-per-step", "8", "--steps", "2"])
    args.out, args.warmup = str(tmp_path), 1
    measured = rows._run_plain(target, bench.resolve_recipe("r2"), "plain", args, "cpu")
    assert tried == [(8, 1, False), (4, 2, False), (2, 4, False)]
    assert (measured.setting.micro_batch, measured.setting.grad_accum) == (2, 4)
    assert measured.tried == ["8x1 recompute off", "4x2 recompute off"]
    assert len(measured.timer.measured()) == 2


def test_gpu_idle_share_counts_gaps_between_kernels_once():
    assert gpu_idle_share([(0, 10), (5, 20), (30, 40)]) == 0.25  # 10 idle of a 40 window
    assert gpu_idle_share([]) is None


def test_end_to_end_phases_come_from_the_workers_events_and_log_lines():
    lines = [
        (0.5, "some import noise"),
        (12.0, format_event("start", recipe="r4-joint")),
        (15.0, format_event("stage_start", recipe="r4-joint", stage="r4-joint")),
        (20.0, "12:00:00 INFO src.training.run: [r4-joint] trainable parameters by part: {}"),
        (30.0, format_event("step", stage="r4-joint", step=1)),
        (31.0, format_event("step", stage="r4-joint", step=2)),
        (33.0, format_event("step", stage="r4-joint", step=3)),
        (36.0, format_event("stage_end", stage="r4-joint")),
        (37.0, format_event("end", status="succeeded")),
    ]
    phases = split_phases(lines, wall=38.0)
    assert phases == {
        "import_s": 15.0,
        "load_s": 5.0,
        "first_step_s": 10.0,
        "train_s": 3.0,
        "save_s": 3.0,
        "exit_s": 2.0,
    }


def test_recipes_file_lets_the_bench_name_its_recipes(tmp_path):
    from src.bench.__main__ import use_recipes_file_of
    from src.recipes import forget_recipe_files

    example = str(Path(__file__).parents[4] / "examples" / "r5.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[r6-mine]\nfrom = "r4-joint"\ntrain_merger = "ful"\n')
    try:
        args = build_parser().parse_args(["--shape", "tiny", "--recipes", "r4,r5", "--recipes-file", example])
        assert use_recipes_file_of(args) == [] and check_args(args) == []
        args = build_parser().parse_args(["--shape", "tiny", "--recipes", "r6", "--recipes-file", str(bad)])
        problems = use_recipes_file_of(args)
        assert len(problems) == 1 and "train_merger" in problems[0] and "bad.toml" in problems[0]
    finally:
        forget_recipe_files()
    assert check_args(build_parser().parse_args(["--shape", "tiny", "--recipes", "r5"])) != []


def test_synthetic_data_holds_every_step_of_a_row_in_one_epoch():
    """A new epoch restarts the loader's prefetching (its first micro-batch waits a whole collation), which a
    user's large data set pays rarely: the bench's synthetic set is big enough that no row crosses one."""
    from types import SimpleNamespace

    from src.bench.targets import MIN_SYNTHETIC_IMAGES, PROFILED_STEPS, synthetic_images

    default = SimpleNamespace(samples_per_step=16, warmup=2, steps=5)
    assert synthetic_images(default) == MIN_SYNTHETIC_IMAGES >= 16 * (2 + 5 + PROFILED_STEPS + 1)
    large = SimpleNamespace(samples_per_step=64, warmup=3, steps=10)
    assert synthetic_images(large) >= 64 * (3 + 10 + PROFILED_STEPS + 1)
