"""The evaluation speed benchmark runs end to end on the tiny model (the GPU run is in docs/benchmarks.md)."""

import json

from src.bench.decoding import main


def test_bench_times_today_and_the_sorted_path_on_the_same_images(
    tiny_model_dir, tiny_data_dir, tmp_path, capsys
):
    out = tmp_path / "bench"
    argv = ["--model-dir", str(tiny_model_dir), "--dataset", str(tiny_data_dir), "--cpu", "--out", str(out)]
    assert main([*argv, "--samples", "3", "--max-new-tokens", "3", "--paths", "today,sorted"]) == 0
    result = json.loads((out / "eval_bench.json").read_text())
    today, new = result["rows"]
    assert (today["path"], today["batch_size"], today["sort_by_size"]) == ("today", 8, False)
    assert (new["path"], new["sort_by_size"], new["same_as_reference"]) == ("sorted", True, "3/3")
    for row in (today, new):
        assert row["images"] == 3 and row["images_per_s"] > 0 and row["decoded_tokens_per_s"] > 0
        assert row["decoding_steps"] <= 3
    assert "random weights never emit the end token" in result["meta"]["note"]
    assert "| today | 8 | False | plain |" in (out / "eval_bench.md").read_text()
    assert "images/s" in capsys.readouterr().out


def test_bench_refuses_bad_flags_with_exit_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 2
    assert "--shape" in capsys.readouterr().err
    assert main(["--model-dir", str(tmp_path), "--out", str(tmp_path), "--paths", "today,warp"]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "unknown warp" in err


def test_bench_decodes_coco_sizes_and_profiles_a_path(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    argv = ["--model-dir", str(tiny_model_dir), "--cpu", "--out", str(out), "--image-sizes", "mixed"]
    argv += ["--samples", "4", "--max-new-tokens", "3", "--paths", "today,sorted", "--profile", "sorted"]
    assert main(argv) == 0
    assert (out / "data-coco-sizes-4" / "test" / "metadata.jsonl").is_file()
    result = json.loads((out / "eval_bench.json").read_text())
    meta, (today, new) = result["meta"], result["rows"]
    assert meta["image_sizes"] == "mixed"
    assert meta["image_size_counts"] == {"640x480": 1, "480x640": 1, "640x427": 1, "500x375": 1}
    assert "profile" not in today and new["profile"]["ms_per_step"] > 0
    profile = json.loads((out / "profile-decode-sorted.json").read_text())
    assert profile["path"] == "sorted" and profile["images"] == 4 and profile["decoding_steps"] == 3
    assert profile["ms_per_step"] > 0 and profile["wall_s"] > 0
    assert profile["gpu_busy_share"] is None and profile["top_self_cuda"] == []  # the CPU: no kernels
    top = profile["top_self_cpu"]
    assert 0 < len(top) <= 15 and all(op["ms"] > 0 and op["calls"] > 0 for op in top)
    steps = profile["steps_unprofiled"]
    assert steps["prefill_ms"] > 0 and steps["decode_steps"] == 2 and steps["decode_ms_median"] > 0
    assert "Self CPU" in (out / "profile-decode-sorted.txt").read_text()
    assert not (out / "profile-decode-today.json").exists()
    markdown = (out / "eval_bench.md").read_text()
    assert "Image sizes: mixed (640x480 x1" in markdown and "Profile of sorted's first batch" in markdown


def test_fast_attention_paths_answer_as_today_on_coco_sizes(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    argv = ["--model-dir", str(tiny_model_dir), "--cpu", "--out", str(out), "--image-sizes", "mixed"]
    argv += ["--samples", "5", "--max-new-tokens", "4", "--paths", "today,fast,fast-static,sorted"]
    assert main(argv) == 0
    rows = {row["path"]: row for row in json.loads((out / "eval_bench.json").read_text())["rows"]}
    assert [rows[p]["fast_attention"] for p in ("today", "fast", "fast-static", "sorted")] == [
        False,
        True,
        True,
        False,
    ]
    assert rows["fast"]["same_as_reference"] == rows["fast-static"]["same_as_reference"] == "5/5"
    assert rows["fast-static"]["decode"] == "static"
    assert "| fast | 8 | True | plain | True |" in (out / "eval_bench.md").read_text()


def test_bench_keeps_the_synthetic_data_while_it_holds_what_is_asked(tmp_path):
    from src.bench.decoding import synthetic_data

    mixed = synthetic_data(tmp_path, 2, mixed=True)
    one = synthetic_data(tmp_path, 2, mixed=False)
    assert (mixed.name, one.name) == ("data-coco-sizes-2", "data-2")
    first = (mixed / "test" / "000000.png").stat().st_mtime_ns
    assert synthetic_data(tmp_path, 2, mixed=True) == mixed
    assert (mixed / "test" / "000000.png").stat().st_mtime_ns == first  # kept, not rewritten
    (mixed / "synthetic.json").write_text((one / "synthetic.json").read_text())  # holds something else
    synthetic_data(tmp_path, 2, mixed=True)
    assert '"sizes"' in (mixed / "synthetic.json").read_text()  # rebuilt with COCO's sizes


def test_bench_refuses_image_sizes_with_a_dataset_and_unknown_profile_paths(tmp_path, capsys):
    base = ["--model-dir", str(tmp_path), "--out", str(tmp_path)]
    assert main([*base, "--image-sizes", "mixed", "--dataset", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--image-sizes mixed with --dataset" in err
    assert main([*base, "--profile", "warp"]) == 2
    assert "--profile warp: unknown warp" in capsys.readouterr().err
    assert main([*base, "--paths", "today", "--profile", "sorted"]) == 2
    assert "sorted not among --paths today" in capsys.readouterr().err
    assert not (tmp_path / "eval_bench.json").exists()


def test_step_times_split_prefill_from_the_decoding_steps():
    from src.bench.decode_profile import step_times

    times = step_times([[0.0, 0.5, 0.52, 0.55, 0.57], [1.0, 1.4, 1.43]])  # two generate() calls
    assert times["prefill_ms"] == 450.0  # each call's first step, averaged
    assert times["decode_ms"] == [20.0, 30.0, 20.0, 30.0] and times["decode_steps"] == 4
    assert (times["decode_ms_median"], times["decode_ms_min"], times["decode_ms_max"]) == (25.0, 20.0, 30.0)
    assert step_times([[0.0, 0.1]])["decode_ms_median"] is None  # one token: prefill alone
