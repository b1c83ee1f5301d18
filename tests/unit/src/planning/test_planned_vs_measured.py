"""scripts/planned_vs_measured.py on the real docs/measured_rows.json: every row is well formed and its
numbers are written in the section of docs/benchmarks.md it cites, the script prints one table row per
JSON row, and its planned columns are the planner's own (estimate_stage_memory, predict_step_seconds)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from src.planning.memory import estimate_recipe_memory, estimate_stage_memory
from src.planning.shapes import published_shape
from src.planning.step_time import predict_step_seconds
from src.recipes import RECIPES

REPO = Path(__file__).resolve().parents[4]
SCRIPT = REPO / "scripts" / "planned_vs_measured.py"
ROWS = REPO / "docs" / "measured_rows.json"
BENCHMARKS = REPO / "docs" / "benchmarks.md"


def _load_script():
    spec = importlib.util.spec_from_file_location("planned_vs_measured", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pvm = _load_script()


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    found = json.loads(ROWS.read_text())
    assert isinstance(found, list) and len(found) >= 100  # the sessions of docs/benchmarks.md, not a sample
    return found


def test_every_row_has_the_required_keys_with_valid_values(rows):
    stages = {stage.name for stage in RECIPES["r3-two-stage"].stages}
    assert stages == {"stage1-vision", "stage2-llm"}
    for row in rows:
        assert pvm.row_problems(row) == [], row
        assert row["recipe"] in ("r1", "r2", "r3", "r4")
        assert row["shape"] in ("2b", "7b", "qwen3-vl-8b")
        assert row["stage"] is None or (row["recipe"] == "r3" and row["stage"] in stages)
        for key in ("compiled", "recompute", "dequantized", "offloaded"):
            assert type(row[key]) is bool, (key, row)
        for key in ("micro_batch", "grad_accum"):
            assert type(row[key]) is int and row[key] >= 1, (key, row)
        assert row["image_sizes"] in ("one", "mixed")
        assert row["peak_kind"] in ("allocated", "reserved", "unknown")
        measured = [row["measured_peak_gib"], row["measured_step_s"]]
        assert any(value is not None for value in measured)
        assert all(value is None or (type(value) is float and value > 0) for value in measured)
        assert row["source"].startswith("docs/benchmarks.md, ")
    # every recipe, both stages of r3, every shape and both cards are there
    assert {row["recipe"] for row in rows} == {"r1", "r2", "r3", "r4"}
    assert {row["stage"] for row in rows} >= stages
    assert {row["shape"] for row in rows} == {"2b", "7b", "qwen3-vl-8b"}
    assert {row["card"] for row in rows} == {"H100 80GB HBM3", "H200"}


def test_the_row_check_rejects_bad_rows(rows):
    good = next(row for row in rows if row["recipe"] == "r1" and row["dequantized"])
    bad = {
        "recipe": {"recipe": "r5"},
        "shape": {"shape": "72b"},
        "compiled": {"compiled": 1},  # an int is not a bool
        "micro_batch": {"micro_batch": True},  # nor a bool an int
        "stage": {"stage": "stage1-vision"},  # r1 has no stages
        "dequantized": {"recipe": "r2", "dequantized": True},  # nothing 4-bit to dequantize
        "planned_patches": {"image_sizes": "mixed"},  # a mixed row says what it was planned at
        "text_tokens": {"planned_patches": 1936, "text_tokens": 72},  # and a one-size row does not
    }
    for key, change in bad.items():
        problems = pvm.row_problems({**good, **change})
        assert any(key in problem for problem in problems), (key, problems)
    assert any("missing" in p for p in pvm.row_problems({k: v for k, v in good.items() if k != "card"}))


def _sections(text: str) -> dict[str, list[str]]:
    """Heading text -> the lines of its section (to the next heading of the same or a higher level)."""
    lines = text.splitlines()
    found = {}
    for i, line in enumerate(lines):
        match = re.match(r"(#+) (.*)", line)
        if not match:
            continue
        level = len(match.group(1))
        end = next(
            (j for j in range(i + 1, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[j])), len(lines)
        )
        found.setdefault(match.group(2), lines[i + 1 : end])
    return found


def _numbers(lines: list[str]) -> set[float]:
    return {float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", "\n".join(lines))}


def test_every_measured_number_is_written_in_the_section_it_cites(rows):
    sections = _sections(BENCHMARKS.read_text())
    for row in rows:
        headings = row["source"].removeprefix("docs/benchmarks.md, ").split(" > ")
        assert all(heading in sections for heading in headings), row["source"]
        top, last = sections[headings[0]], sections[headings[-1]]
        assert headings[-1] == headings[0] or f"### {headings[-1]}" in top, row["source"]  # nested
        numbers = _numbers(last)
        for key in ("measured_peak_gib", "measured_step_s"):
            if row[key] is not None:
                assert row[key] in numbers, (key, row[key], row["source"])
        assert row["card"] in "\n".join(top), (row["card"], row["source"])


def test_the_script_prints_one_table_row_per_json_row(rows, capsys):
    assert pvm.main(["--rows", str(ROWS), "--markdown"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| shape | card | recipe / stage | setting | planned GiB | measured GiB")
    assert set(table[1].replace(" ", "")) == {"|", "-"}
    body = table[2:]
    assert len(body) == len(rows)
    for line, row in zip(body, rows, strict=True):
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert len(cells) == len(pvm.HEADER)
        assert cells[0] == row["shape"] and cells[1] == row["card"]
        assert float(cells[4]) > 0  # a planned peak for every row
        if row["measured_peak_gib"] is None:
            assert cells[5] == "-" and cells[6] == "-"
        else:
            assert float(cells[5]) == pytest.approx(row["measured_peak_gib"])
            assert re.fullmatch(r"[+-]\d+\.\d%", cells[6])
    assert re.search(r"Core rows \(\d+\): peak within 5%: \d+ of \d+; step within 15%: \d+ of \d+", out)
    assert "Worst peaks:" in out and "Worst steps:" in out


def test_the_script_runs_as_a_script_and_prints_every_row():
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("\n\n")[0].splitlines()
    assert table[0].split()[:2] == ["shape", "card"]
    assert len(table) - 1 == len(json.loads(ROWS.read_text()))


def _row(rows, **fields) -> dict:
    matches = [row for row in rows if all(row.get(k) == v for k, v in fields.items())]
    assert len(matches) == 1, (fields, len(matches))
    return matches[0]


def test_a_rows_planned_peak_and_step_are_the_planners_own(rows):
    # The tenth session's Qwen3-VL-8B r1 at 8x2, compiled, recompute off, 4-bit weights dequantized once:
    # its samples are 1,200 patches and ~100 text tokens (docs/benchmarks.md); the largest has 122.
    row = _row(rows, shape="qwen3-vl-8b", recipe="r1", micro_batch=8, grad_accum=2)
    setting = (row["compiled"], row["recompute"], row["dequantized"], row["offloaded"])
    assert setting == (True, False, True, False)
    shape, _ = published_shape("qwen3-vl-8b")
    r1 = RECIPES["r1-llm-only"]
    expected = estimate_stage_memory(shape, r1, 8, 1200, 100, False, compiled=True, dequantized=True)
    assert pvm.planned_gib(row) == expected.gib
    assert expected.gib == pytest.approx(46.01, abs=0.01)  # measured 45.45; planned 44.69 before the refit
    assert pvm.planned_step_s(row) == predict_step_seconds(shape, r1, 8, 2, 1200, 122, False, True)
    # 7B r4 offloaded (eighth session): 1564 patches (391 image tokens) and 76 text tokens a sample
    row = _row(rows, shape="7b", recipe="r4", offloaded=True, measured_step_s=1.4174)
    seven_b, _ = published_shape("7b")
    r4 = RECIPES["r4-joint"]
    expected = estimate_stage_memory(seven_b, r4, 8, 1564, 76, True, compiled=True, offloaded=True)
    assert pvm.planned_gib(row) == expected.gib
    assert pvm.planned_gib(row) < pvm.planned_gib({**row, "offloaded": False})  # the option is passed
    # r3 without a stage is the chain's peak: its larger stage
    row = _row(rows, shape="7b", recipe="r3", stage=None, measured_peak_gib=38.2)
    r3 = RECIPES["r3-two-stage"]
    assert pvm.planned_gib(row) == estimate_recipe_memory(seven_b, r3, 4, 1564, 76, False).gib
    # 7B r4 on mixed sizes, grouped (thirteenth session): planned at the largest image, 612x612
    row = _row(rows, shape="7b", recipe="r4", image_sizes="mixed", measured_peak_gib=44.74)
    assert pvm.planned_gib(row) == estimate_stage_memory(seven_b, r4, 4, 1936, 72, False, compiled=True).gib
    assert pvm.compute([row])[0].planned_gib == pvm.planned_gib(row) == pytest.approx(44.30, abs=0.01)


def test_the_rows_before_frozen_towers_ran_under_no_grad_are_planned_so(rows):
    row = _row(rows, shape="7b", recipe="r1", frozen_vision_no_grad=False)
    shape, _ = published_shape("7b")
    old = estimate_stage_memory(shape, RECIPES["r1-llm-only"], 4, 1564, 76, True, frozen_vision_no_grad=False)
    assert pvm.planned_gib(row) == old.gib > pvm.planned_gib({**row, "frozen_vision_no_grad": True})


def test_the_text_token_constants_are_what_the_bench_derives(tmp_path):
    """The bench's synthetic data and offline processors, on the CPU (what the script cannot load)."""
    pytest.importorskip("transformers")
    from src.bench.targets import _synthetic_data, sample_stats
    from src.data.dataset import build_dataset
    from src.fixtures.shapes import shape_parts
    from src.training.memory import largest_sample

    data = _synthetic_data(tmp_path, 64)  # sample_stats reads 16 samples, largest_sample 64
    for name, family in (("7b", "qwen2_vl"), ("qwen3-vl-8b", "qwen3_vl")):
        processor = shape_parts(name)[2]
        dataset, _ = build_dataset(str(data), "train", family, processor)
        stats = sample_stats(dataset, processor)
        sample = pvm.bench_sample(name)
        assert stats["tokens"] == pvm.TOKENS_A_SAMPLE[name]
        assert stats["patches"] == sample.patches
        assert largest_sample(dataset, processor) == (sample.patches, pvm.LARGEST_TEXT_TOKENS[name])


def test_the_table_in_the_benchmarks_is_what_the_planner_gives_today():
    """docs/benchmarks.md keeps the script's table: a change to the planner regenerates it
    (`python scripts/planned_vs_measured.py --markdown`), so the page never shows an old planner's columns."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--markdown"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    page = (REPO / "docs" / "benchmarks.md").read_text()
    assert len(table) > 100 and "\n".join(table) in page
