"""`recipe-run --lr-search`: trials rung by rung on a fake GPU host, the rung rule, a failed trial, Ctrl-C
and resume, the test split read only by the chosen runs at the end; then a real tiny search on the CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from recipe_runner.cli.main import main
from tests.conftest import REPO, alive, wait_until

SCALES = [1 / 9, 1 / 3, 1.0, 3.0, 9.0]  # the default grid: each recipe's own rate x 3^k, k = -2..2


def trial_records(host) -> list[dict]:
    """What each fake worker was given, in the order they started."""
    return sorted(host.records(), key=lambda r: r["start"])


def flag(record: dict, name: str) -> str | None:
    argv = record["argv"]
    return argv[argv.index(name) + 1] if name in argv else None


def test_each_recipe_is_tuned_by_halving_and_scored_once_on_the_test_split(host, monkeypatch, capsys):
    behaviour = {
        "r1-llm-only": {"best_scale": 3.0},
        "r2-vision-only": {"best_scale": 1 / 3, "fail_scale": 9.0},
        "*": {"steps": 1},
    }
    host.set_behaviour(monkeypatch, behaviour)
    argv = ["--recipes", "r1,r2", "--lr-search", "--max-steps", "9", "--output-dir", str(host.out), "--plain"]
    assert main(argv) == 0
    # The answer is on screen when the command ends: the winner, how sure, the rates chosen.
    end = capsys.readouterr().out.rstrip().splitlines()[-2:]
    assert end[0].startswith("Winner by F1 at IoU 0.5: r")
    chosen = "r1-llm-only 0.0006, r2-vision-only 3.33e-05"
    assert end[1] == f"Learning rates chosen on the validation split: {chosen}."
    (launch,) = host.launch_dirs()
    search = json.loads((launch / "search.json").read_text())
    assert search["rungs"] == {"r1-llm-only": [1, 3, 9], "r2-vision-only": [1, 3, 9]}
    assert search["chosen"] == {"r1-llm-only": pytest.approx(6e-4), "r2-vision-only": pytest.approx(3.33e-05)}
    r2 = {round(t["learning_rate"] / 1e-4, 2): t for t in search["trials"] if t["recipe"] == "r2-vision-only"}
    assert r2[9.0]["status"] == "failed" and "rung 1" in r2[9.0]["error"]
    states = sorted((t["status"], t["rung"]) for t in search["trials"] if t["recipe"] == "r1-llm-only")
    assert states == [("complete", 3), ("pruned", 1), ("pruned", 1), ("pruned", 1), ("pruned", 2)]

    records = trial_records(host)
    trials = [r for r in records if flag(r, "--eval-split") == "validation"]
    finals = [r for r in records if flag(r, "--eval-split") == "test"]
    # 5 + 5 trials at the first rung (one fails), 2 + 2 at the second, 1 + 1 at the full budget.
    assert len(trials) == 16 and sorted(r["recipe"] for r in finals) == ["r1-llm-only", "r2-vision-only"]
    assert [flag(r, "--pause-at") for r in trials].count("1") == 10
    assert all(flag(r, "--baseline-dir") is None for r in trials)  # the base is scored on test, at the end
    # The test split is read by the chosen runs alone, after every trial has ended.
    assert min(r["start"] for r in finals) > max(r["end"] for r in trials)
    assert all("--resume" in r["argv"] for r in finals)
    assert [r["recipe"] for r in finals if flag(r, "--baseline-dir")] == ["r1-llm-only"]  # once, beside one

    summary = json.loads((launch / "summary.json").read_text())
    assert [j["name"] for j in summary["jobs"]] == ["r1-llm-only", "r2-vision-only"]
    assert len(summary["trials"]) == 16 and summary["exit_code"] == 0
    # A recipe's row costs its chosen run's every rung and its scoring, not the scoring alone.
    r1_chosen = next(t["trial"] for t in search["trials"] if t["recipe"] == "r1-llm-only" and t["rung"] == 3)
    rungs = [t["duration_s"] for t in summary["trials"] if t["name"] == r1_chosen]
    assert len(rungs) == 3 and summary["jobs"][0]["duration_s"] > sum(rungs)
    report = json.loads((launch / "report.json").read_text())
    assert {t["recipe"] for t in report["search"]["trials"]} == {"r1-llm-only", "r2-vision-only"}
    assert set(report["search"]["trials"][0]) >= {"recipe", "learning_rate", "rung", "val_metric", "status"}
    assert report["search"]["verdicts"]["r1-llm-only"]["edge"] is None
    markdown = (launch / "report.md").read_text()
    assert "## How each recipe was tuned" in markdown and (launch / "search.png").is_file()


def test_trials_on_the_cpu_share_the_cores_as_the_launchs_recipes_would(host, monkeypatch):
    host.set_behaviour(monkeypatch, {"*": {"steps": 1, "step_s": 0.3}})
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    argv = ["--recipes", "r1,r2", "--cpu", "--lr-search", "--max-steps", "9", "--output-dir", str(host.out)]
    assert main([*argv, "--plain"]) == 0
    trials = [r for r in trial_records(host) if flag(r, "--eval-split") == "validation"]
    assert len(trials) == 16 and {flag(r, "--threads") for r in trials} == {"2"}  # 4 cores, 2 at once
    at_once = max(sum(o["start"] <= r["start"] < o["end"] for o in trials) for r in trials)
    assert at_once == 2


def test_a_chain_whose_rungs_come_before_its_last_stage_is_flagged(host, monkeypatch):
    host.set_behaviour(monkeypatch, {"*": {"steps": 1}})
    argv = ["--recipes", "r1,r3", "--lr-search", "--max-steps", "9", "--output-dir", str(host.out)]
    assert main([*argv, "--plain"]) == 0
    (launch,) = host.launch_dirs()
    search = json.loads((launch / "search.json").read_text())
    assert search["rungs"]["r3-two-stage"] == [2, 6, 18] and search["last_stage_from"] == {"r3-two-stage": 9}
    notes = [line for line in (launch / "report.md").read_text().splitlines() if line.startswith("**Note:**")]
    assert len(notes) == 1 and "`r3-two-stage`'s rung(s) at step 2, 6 come before its last stage" in notes[0]


def test_a_grid_whose_best_rate_is_its_edge_says_to_widen_it(host, monkeypatch):
    host.set_behaviour(monkeypatch, {"*": {"steps": 1, "best_scale": 9.0}})
    argv = ["--recipes", "r4", "--lr-search", "--lr-grid", "1e-5,1e-4", "--max-steps", "3", "--halving", "1"]
    assert main([*argv, "--output-dir", str(host.out), "--plain"]) == 0
    (launch,) = host.launch_dirs()
    assert (
        "rate of the grid: a better one may lie beyond it; widen the grid"
        in (launch / "report.md").read_text()
    )
    trials = json.loads((launch / "search.json").read_text())["trials"]
    assert [(t["steps"], t["status"]) for t in trials] == [(3, "complete"), (3, "complete")]  # halving 1


def test_ctrl_c_mid_search_loses_nothing_and_resume_goes_on_without_rerunning_a_rung(host, monkeypatch):
    slow = {"r1-llm-only": {"steps": 1}, "r2-vision-only": {"steps": 400, "step_s": 0.05, "grandchild": True}}
    host.set_behaviour(monkeypatch, slow)
    host.env["RECIPE_RUNNER_FAKE_GPUS"] = "4"
    argv = ["--recipes", "r1,r2", "--lr-search", "--lr-grid", "1e-4,3e-4,1e-3", "--max-steps", "9"]
    launcher = host.launcher(*argv, "--output-dir", str(host.out), "--plain")
    r1_done = lambda: sum(1 for r in host.records() if r["recipe"] == "r1-llm-only" and "end" in r) >= 3  # noqa: E731
    assert wait_until(lambda: r1_done() and len(host.records()) >= 4, timeout=60)
    launcher.send_signal(signal.SIGINT)
    output, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, output
    pids = [pid for r in host.records() for pid in (r["pid"], r["grandchild"]) if pid]
    assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10)
    (launch,) = host.launch_dirs()
    scored = [t for t in json.loads((launch / "search.json").read_text())["trials"] if t["steps"]]
    assert {t["recipe"] for t in scored} == {"r1-llm-only"}  # r1's first rung is kept in the study

    host.set_behaviour(monkeypatch, {"*": {"steps": 1}})
    done = subprocess.run(
        [sys.executable, "-m", "recipe_runner", "resume", str(launch), "--plain"],
        cwd=REPO,
        env=host.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    r1_rung1 = [r for r in host.records() if r["recipe"] == "r1-llm-only" and flag(r, "--pause-at") == "3"]
    assert len(r1_rung1) == 3  # each r1 trial ran its first rung once: the resume did not run it again
    summary = json.loads((launch / "summary.json").read_text())
    assert [(j["name"], j["status"]) for j in summary["jobs"]] == [
        ("r1-llm-only", "succeeded"),
        ("r2-vision-only", "succeeded"),
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr-search", "--lr-grid", "1e-3"], "at least two rates"),
        (["--lr-search", "--lr-grid", "0,1e-3"], "every rate must be above 0"),
        (["--lr-search", "--halving", "0"], "--halving 0: must be at least 1"),
        (["--lr-grid", "1e-3,1e-2"], "--lr-grid needs --lr-search"),
        (["--val-fraction", "0.2"], "--val-fraction needs --lr-search"),
        (["--lr-search", "--learning-rate", "1e-4"], "--learning-rate and --lr-search exclude each other"),
        (["--lr-search", "--seeds", "0,1"], "--lr-search runs one seed on one data set"),
    ],
)
def test_a_bad_search_exits_2_before_anything_starts(host, capsys, argv, message):
    assert main(["--recipes", "r1,r4", *argv, "--max-steps", "9", "--output-dir", str(host.out)]) == 2
    assert message in capsys.readouterr().err
    assert not host.out.exists() and host.records() == []


def test_plan_shows_the_search_its_rungs_and_what_it_costs(host, config_only_7b, capsys, monkeypatch):
    model, data = config_only_7b
    host.set_gpus(monkeypatch, '[{"memory_total_mib": 81559}]')
    argv = ["plan", "--recipes", "all", "--lr-search", "--model-id", str(model), "--dataset", str(data)]
    assert main([*argv, "--max-steps", "900", "--batch-size", "4", "--gpus", "0"]) == 0
    shown = capsys.readouterr().out
    assert "learning-rate search: halving 3" in shown and "100, 300, 900" in shown
    assert "1.67" in shown and "GPU-hours" in shown and "makespan about" in shown
    # rung by rung, as the executor places the trials: never shorter than every GPU-hour on the one GPU
    line = next(row for row in shown.splitlines() if row.startswith("predicted:"))
    hours = float(line.split("predicted: ")[1].split(" GPU-hours")[0])
    minutes = float(line.split("makespan about ")[1].split(" min")[0])
    assert minutes >= hours * 60 - 1 and "(the untuned comparison about" in line
    assert not host.out.exists()
    # 900 steps is long enough for --compile auto to compile a whole run, but each trial job would compile
    # again for its part: every job of the search is planned and run eager
    commands = [row for row in shown.splitlines() if row.strip().startswith("command:")]
    assert len(commands) == 4 and all("--compile off" in row for row in commands)
    # every trial job at every rung pays a job's fixed seconds (5 + 2 + 1 and the test scoring, per recipe)
    assert "the search starts 36 jobs where the untuned comparison starts 4" in shown
    assert "at most 2x from about --max-steps" in shown


def test_a_search_keeps_compile_on_where_it_was_asked(host, config_only_7b, capsys, monkeypatch):
    model, data = config_only_7b
    host.set_gpus(monkeypatch, '[{"memory_total_mib": 81559}]')
    argv = ["plan", "--recipes", "r4", "--lr-search", "--model-id", str(model), "--dataset", str(data)]
    assert main([*argv, "--max-steps", "90", "--batch-size", "4", "--gpus", "0", "--compile", "on"]) == 0
    command = next(row for row in capsys.readouterr().out.splitlines() if "command:" in row)
    assert "--compile on" in command


@pytest.mark.slow
def test_a_real_tiny_search_on_the_cpu_chooses_on_validation_and_scores_on_test(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    from src.data.dataset import read_raw_records
    from tests.integration.test_end_to_end import launched

    out = tmp_path / "out"
    _, launch = launched(
        *("--recipes", "r1,r4", "--cpu", "--lr-search", "--lr-grid", "1e-3,3e-3,1e-2", "--max-steps", "3"),
        *(
            "--model-id",
            str(tiny_model_dir),
            "--dataset",
            str(tiny_data_dir),
            "--no-wandb",
            "--batch-size",
            "2",
        ),
        out=out,
        tmp_path=tmp_path,
        timeout=900,
    )
    report = json.loads((launch / "report.json").read_text())
    trials = report["search"]["trials"]
    assert len(trials) == 6 and set(report["search"]["chosen"]) == {"r1-llm-only", "r4-joint"}
    assert {t["status"] for t in trials} == {"complete", "pruned"} and (launch / "search.png").is_file()

    def images(split: str) -> set[str]:
        return {str(r.image) for r in read_raw_records(str(tiny_data_dir), split, val_fraction=0.1)}

    validation, test = images("validation"), images("test")
    assert report["splits"]["validation"]["images"] == len(validation) == 4
    assert report["splits"]["test"]["images"] == len(test)
    for trial in (t for t in trials if t["status"] == "pruned"):  # scored on validation, never on test
        rows = (launch / trial["trial"] / "predictions.jsonl").read_text().splitlines()
        seen = {json.loads(row)["image"] for row in rows}
        assert seen == validation and not seen & test
    for log in (launch / "logs").glob("*-lr*.log"):
        text = log.read_text()
        assert "on the test split" not in text and '"split": "validation"' in text, log
    for recipe in ("r1-llm-only", "r4-joint"):
        assert "evaluation on the test split" in (launch / "logs" / f"{recipe}.log").read_text()
