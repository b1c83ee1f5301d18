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
    assert (new["path"], new["sort_by_size"], new["same_as_today"]) == ("sorted", True, "3/3")
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
