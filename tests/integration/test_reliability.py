"""Faults the launcher survives: OOM retries, hung workers, resume, truthful summaries, no secrets."""

import json

import pytest

from recipe_runner.cli.main import main
from recipe_runner.planning.jobs import JobSpec, oom_retry
from src.contract.flags import flag_value


def _spec(*argv):
    return JobSpec("r1-llm-only", ("python", "-m", "w", *argv), {}, None, None)


def test_oom_retry_halves_the_batch_keeps_the_effective_batch_and_resumes():
    retry = oom_retry(_spec("--batch-size", "8", "--grad-accum", "2"))
    assert (flag_value(retry.argv, "--batch-size"), flag_value(retry.argv, "--grad-accum")) == ("4", "4")
    assert retry.argv.count("--resume") == 1 and retry.argv.count("--batch-size") == 1
    default = oom_retry(_spec())  # the worker's defaults: 4 x 1
    assert (flag_value(default.argv, "--batch-size"), flag_value(default.argv, "--grad-accum")) == ("2", "2")
    odd = oom_retry(_spec("--batch-size", "3"))
    assert (flag_value(odd.argv, "--batch-size"), flag_value(odd.argv, "--grad-accum")) == ("1", "3")
    assert oom_retry(_spec("--batch-size", "1")) is None


def test_oom_is_retried_with_smaller_batches_until_it_fits(host, monkeypatch):
    host.set_behaviour(monkeypatch, {"r1-llm-only": {"oom_above": 1}})
    code = main(
        [
            "--recipes",
            "r1,r2",
            "--gpus",
            "0,1",
            "--batch-size",
            "4",
            "--oom-retries",
            "2",
            "--output-dir",
            str(host.out),
            "--plain",
        ]
    )
    assert code == 0
    jobs = {job["recipe"]: job for job in host.summary()["jobs"]}
    r1 = jobs["r1-llm-only"]
    assert r1["status"] == "succeeded"
    assert [(a["status"], a["batch_size"], a["grad_accum"]) for a in r1["attempts"]] == [
        ("oom", "4", None),
        ("oom", "2", "2"),
    ]
    assert flag_value(r1["argv"], "--batch-size") == "1" and flag_value(r1["argv"], "--grad-accum") == "4"
    assert jobs["r2-vision-only"]["attempts"] == []
    tries = [r for r in host.records() if r["recipe"] == "r1-llm-only"]
    assert sorted(r["exit"] for r in tries) == [0, 3, 3]


def test_oom_retries_are_bounded(host, monkeypatch):
    host.set_behaviour(monkeypatch, {"*": {"oom_above": 0}})
    code = main(
        ["--recipes", "r1", "--gpus", "0", "--oom-retries", "1", "--output-dir", str(host.out), "--plain"]
    )
    (job,) = host.summary()["jobs"]
    assert code == 1 and job["status"] == "oom" and len(job["attempts"]) == 1


def test_a_hung_worker_is_reported_and_killed_when_asked(host, monkeypatch, capsys):
    host.set_behaviour(monkeypatch, {"r1-llm-only": {"silent_s": 60}})
    code = main(
        [
            "--recipes",
            "r1,r2",
            "--gpus",
            "0,1",
            "--hang-timeout",
            "1",
            "--kill-hung",
            "--output-dir",
            str(host.out),
            "--plain",
        ]
    )
    jobs = {job["recipe"]: job for job in host.summary()["jobs"]}
    assert code == 1
    assert jobs["r1-llm-only"]["status"] == "hung" and jobs["r2-vision-only"]["status"] == "succeeded"
    assert "no output for 1s: looks hung; ending it" in capsys.readouterr().out


def test_resume_reruns_only_what_did_not_succeed(host, monkeypatch):
    host.set_behaviour(monkeypatch, {"r2-vision-only": {"exit": 1}})
    assert main(["--recipes", "r1,r2", "--gpus", "0,1", "--output-dir", str(host.out), "--plain"]) == 1
    (launch,) = host.launch_dirs()
    host.set_behaviour(monkeypatch, {})
    assert main(["resume", str(launch), "--gpus", "0,1", "--plain"]) == 0
    summary = host.summary()
    assert [(j["recipe"], j["status"]) for j in summary["jobs"]] == [
        ("r1-llm-only", "succeeded"),
        ("r2-vision-only", "succeeded"),
    ]
    runs = [r["recipe"] for r in host.records()]
    assert runs.count("r1-llm-only") == 1 and runs.count("r2-vision-only") == 2
    second = [r for r in host.records() if r["recipe"] == "r2-vision-only"][-1]
    assert "--resume" in second["argv"]
    log = (launch / "logs" / "r2-vision-only.log").read_text()
    assert log.count("# command:") == 2  # appended, not replaced
    assert main(["resume", str(launch), "--gpus", "0,1"]) == 0  # nothing left to do


def test_summary_tells_the_truth_while_running(host, monkeypatch):
    host.set_behaviour(monkeypatch, {"r1-llm-only": {"steps": 40, "step_s": 0.05}})
    launcher = host.launcher(
        "--recipes", "r1,r2,r3", "--gpus", "0,1", "--output-dir", str(host.out), "--plain"
    )
    try:

        def r2_done():
            try:
                jobs = {j["recipe"]: j["status"] for j in host.summary()["jobs"]}
            except (ValueError, FileNotFoundError):
                return False
            return jobs.get("r2-vision-only") == "succeeded"

        from tests.conftest import wait_until

        assert wait_until(r2_done, timeout=20)
        summary = host.summary()
        jobs = {j["recipe"]: j["status"] for j in summary["jobs"]}
        assert summary["exit_code"] is None and jobs["r1-llm-only"] == "running"
        assert jobs["r3-two-stage"] in ("not started", "running")
    finally:
        launcher.wait(timeout=60)
    assert host.summary()["exit_code"] == 0


def test_secrets_in_the_environment_never_reach_logs_or_summaries(host, monkeypatch):
    secret = "wandb-key-0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    host.set_behaviour(monkeypatch, {"*": {"say": f"debug: key is {secret}", "exit": 1}})
    main(["--recipes", "r1", "--gpus", "0", "--output-dir", str(host.out), "--plain"])
    (launch,) = host.launch_dirs()
    written = [p for p in launch.rglob("*") if p.is_file()]
    assert any("key is ***" in p.read_text() for p in written)
    assert not any(secret in p.read_text() for p in written)
    assert json.loads((launch / "summary.json").read_text())["jobs"][0]["last_lines"]


def test_duplicate_recipe_exits_2_and_starts_nothing(host, capsys):
    assert main(["--recipes", "r1,r1-llm-only", "--gpus", "0", "--output-dir", str(host.out)]) == 2
    assert "r1-llm-only is named twice" in capsys.readouterr().err
    assert not host.out.exists() and host.records() == []


def test_bad_dataset_is_refused_before_any_worker_starts(host, monkeypatch, tmp_path, capsys, tiny_model_dir):
    monkeypatch.delenv("RECIPE_RUNNER_WORKER")  # the real worker's contract: the launcher checks its input
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    (data / "metadata.jsonl").write_text(
        json.dumps({"file_name": "gone.png", "objects": {"bbox": [[0, 0, 5, 5]], "label": ["cat"]}}) + "\n"
    )
    code = main(
        [
            "--recipes",
            "all",
            "--gpus",
            "0,1",
            "--model-id",
            str(tiny_model_dir),
            "--dataset",
            str(tmp_path / "data"),
            "--output-dir",
            str(host.out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "record 0 (metadata.jsonl line 1 (gone.png)): image" in err and "not found" in err
    assert "nothing was started or written" in err
    assert not host.out.exists()


@pytest.mark.parametrize(
    "model_type, why",
    [
        ("llama", "model_type 'llama' is not a model recipe-runner trains"),
        (
            "qwen3_vl_moe",
            "model_type 'qwen3_vl_moe' is not supported: Qwen3-VL MoE keeps its experts in fused",
        ),
        ("qwen3_5_moe", "model_type 'qwen3_5_moe' is not supported"),
    ],
)
def test_a_model_we_do_not_train_is_refused_before_anything_starts(
    host, monkeypatch, tmp_path, capsys, tiny_data_dir, model_type, why
):
    monkeypatch.delenv("RECIPE_RUNNER_WORKER")
    (tmp_path / model_type).mkdir()
    (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
    code = main(
        [
            "--recipes",
            "r1",
            "--gpus",
            "0",
            "--model-id",
            str(tmp_path / model_type),
            "--dataset",
            str(tiny_data_dir),
            "--output-dir",
            str(host.out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and why in err
    assert "Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense) and Qwen3.5 (dense)" in err  # what is supported
    assert not host.out.exists()
