"""Sweeps: --seeds and --datasets multiply the plan; the report aggregates over seeds."""

import json

import pytest

from recipe_runner.cli.main import main
from recipe_runner.planning.jobs import build_jobs
from recipe_runner.planning.request import SweepPoint, sweep_points
from recipe_runner.results.report import build_report
from src.contract.flags import TrainFlags, flag_value


def test_sweep_points_tag_only_what_varies():
    assert sweep_points(None, None) == [SweepPoint()]
    assert [p.tag for p in sweep_points([0, 1], None)] == ["-seed0", "-seed1"]
    assert [p.tag for p in sweep_points(None, ["x/a", "y/b/"])] == ["-a", "-b"]
    assert [p.tag for p in sweep_points([3], ["x/data", "y/data"])] == ["-d0-data", "-d1-data"]
    assert len(sweep_points([0, 1, 2], ["a", "b"])) == 6


def test_plan_runs_every_recipe_per_seed_and_dataset(tmp_path):
    specs = build_jobs(
        ["r1-llm-only", "r3-two-stage"],
        tmp_path,
        TrainFlags(max_steps=2),
        ["w"],
        sweep=sweep_points([0, 1], ["d/a", "d/b"]),
    )
    assert [s.key for s in specs] == [
        "r1-llm-only-a-seed0",
        "r3-two-stage-a-seed0",
        "r1-llm-only-a-seed1",
        "r3-two-stage-a-seed1",
        "r1-llm-only-b-seed0",
        "r3-two-stage-b-seed0",
        "r1-llm-only-b-seed1",
        "r3-two-stage-b-seed1",
    ]
    last = specs[-1]
    assert last.recipe == "r3-two-stage" and last.output_dir == tmp_path / "r3-two-stage-b-seed1"
    assert (flag_value(last.argv, "--seed"), flag_value(last.argv, "--dataset")) == ("1", "d/b")
    assert flag_value(last.argv, "--recipe") == "r3-two-stage"
    baselines = {s.key: flag_value(s.argv, "--baseline-dir") for s in specs if "--baseline-dir" in s.argv}
    assert baselines == {
        "r1-llm-only-a-seed0": str(tmp_path / "base-a"),
        "r1-llm-only-b-seed0": str(tmp_path / "base-b"),
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0,x"], "--seeds '0,x'"),
        (["--seeds", "1,1"], "distinct"),
        (["--seeds", "0,1", "--seed", "3"], "--seeds and --seed exclude each other"),
        (["--datasets", "a,a"], "distinct data sets"),
    ],
)
def test_bad_sweeps_exit_2(host, capsys, argv, message):
    assert main(["--recipes", "r1", "--gpus", "0", *argv, "--output-dir", str(host.out)]) == 2
    assert message in capsys.readouterr().err and not host.out.exists()


def test_a_seed_sweep_runs_each_recipe_per_seed_and_reports_mean_and_spread(host, capsys):
    assert (
        main(
            [
                "--recipes",
                "r1,r2",
                "--gpus",
                "0,1",
                "--seeds",
                "0,1,2",
                "--output-dir",
                str(host.out),
                "--plain",
            ]
        )
        == 0
    )
    summary = host.summary()
    names = [(j["name"], j["recipe"], j["seed"], j["status"]) for j in summary["jobs"]]
    assert names[:2] == [
        ("r1-llm-only-seed0", "r1-llm-only", 0, "succeeded"),
        ("r2-vision-only-seed0", "r2-vision-only", 0, "succeeded"),
    ]
    assert len(names) == 6 and len({r["pid"] for r in host.records()}) == 6
    (launch,) = host.launch_dirs()
    for job, precision in zip(summary["jobs"], [0.5, 0.1, 0.7, 0.1, 0.6, 0.1], strict=True):
        (launch / job["name"] / "metrics.json").write_text(
            json.dumps({"precision": precision, "f1": precision})
        )
    report = build_report(launch)
    groups = {g["recipe"]: g for g in report["over_seeds"]}
    r1 = groups["r1-llm-only"]["metrics"]["precision"]
    assert (r1["mean"], r1["n"]) == (0.6, 3) and r1["std"] == pytest.approx(0.0816, abs=1e-4)
    assert groups["r2-vision-only"]["metrics"]["precision"]["std"] == 0.0
