"""Launches with fake workers on a fake GPU host: queueing, r3 as one job, failure isolation,
summary.json, logs, CPU thread splitting, --wait. `main()` runs in-process; workers are real
subprocesses (tests/fakes/worker.py)."""

from __future__ import annotations

import json
import os
import threading
import time

from recipe_runner.cli.main import main
from recipe_runner.host.leases import holder
from recipe_runner.planning.placement import MAX_GPU_WORKER_THREADS
from src.contract.flags import flag_value
from src.contract.progress import PREFIX

THREADS = min(MAX_GPU_WORKER_THREADS, os.cpu_count() or 1)


def launch(host, *args: str) -> int:
    return main(["--output-dir", str(host.out), "--plain", *args])


def overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_three_recipes_on_two_gpus_queue_and_never_share_a_gpu(host, monkeypatch, capsys) -> None:
    host.set_behaviour(monkeypatch, {"*": {"steps": 3, "step_s": 0.1}})
    assert launch(host, "--recipes", "r1,r2,r4", "--gpus", "0,1") == 0
    records = host.records()
    assert sorted(r["recipe"] for r in records) == ["r1-llm-only", "r2-vision-only", "r4-joint"]
    for a in records:
        same_gpu = [
            b
            for b in records
            if b is not a and b["env"]["CUDA_VISIBLE_DEVICES"] == a["env"]["CUDA_VISIBLE_DEVICES"]
        ]
        assert not any(overlaps(a, b) for b in same_gpu)
    first, second, third = sorted(records, key=lambda r: r["start"])
    assert third["recipe"] == "r4-joint"
    assert third["start"] >= min(first["end"], second["end"])  # it waited for a GPU to free
    summary = host.summary()
    assert summary["exit_code"] == 0 and summary["succeeded"] == 3
    assert [j["status"] for j in summary["jobs"]] == ["succeeded"] * 3
    assert {j["device"] for j in summary["jobs"]} == {"gpu0", "gpu1"}


def test_children_get_their_gpu_by_uuid_and_the_multicast_switches(host, capsys) -> None:
    assert launch(host, "--recipes", "r1", "--gpus", "1") == 0
    (record,) = host.records()
    assert record["env"] == {
        "CUDA_VISIBLE_DEVICES": "GPU-fake-0001",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "RECIPE_RUNNER_GPU_BUDGET_MIB": None,  # not packed: no memory plan for the fake model
        "OMP_NUM_THREADS": str(THREADS),  # one job at a time: every core, up to the cap
        "MKL_NUM_THREADS": str(THREADS),
        "RAYON_NUM_THREADS": str(THREADS),
        "PYTHONUNBUFFERED": "1",
    }
    (launch_dir,) = host.launch_dirs()
    assert record["argv"][:4] == ["--recipe", "r1-llm-only", "--output-dir", str(launch_dir / "r1-llm-only")]
    assert "--gpu" not in record["argv"]
    assert holder(host.lease_dir, "GPU-fake-0001") is None  # released after the run


def test_gpu_workers_running_at_once_split_the_cpu_cores(host, monkeypatch, capsys) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert launch(host, "--recipes", "r1,r2,r4", "--gpus", "0,1") == 0  # two at a time
    for record in host.records():
        assert record["env"]["OMP_NUM_THREADS"] == "4"
        assert record["argv"][record["argv"].index("--threads") + 1] == "4"


def test_gpus_per_recipe_gives_each_worker_its_own_set(host, monkeypatch, capsys) -> None:
    host.set_gpus(monkeypatch, "4")
    host.set_behaviour(monkeypatch, {"*": {"step_s": 0.1}})
    assert launch(host, "--recipes", "r1,r4", "--gpus-per-recipe", "2") == 0
    devices = sorted(r["env"]["CUDA_VISIBLE_DEVICES"] for r in host.records())
    assert devices == ["GPU-fake-0000,GPU-fake-0001", "GPU-fake-0002,GPU-fake-0003"]
    assert {j["device"] for j in host.summary()["jobs"]} == {"gpu0,1", "gpu2,3"}


def test_one_failure_does_not_stop_the_others(host, monkeypatch, capsys) -> None:
    host.set_behaviour(monkeypatch, {"r2-vision-only": {"exit": 1, "steps": 25}, "r3-two-stage": {"exit": 3}})
    host.set_gpus(monkeypatch, "4")
    assert launch(host, "--recipes", "r1,r2,r3,r4") == 1
    jobs = {j["recipe"]: j for j in host.summary()["jobs"]}
    assert {k: j["status"] for k, j in jobs.items()} == {
        "r1-llm-only": "succeeded",
        "r2-vision-only": "failed",
        "r3-two-stage": "oom",
        "r4-joint": "succeeded",
    }
    assert jobs["r2-vision-only"]["exit_code"] == 1 and jobs["r3-two-stage"]["exit_code"] == 3
    failed = jobs["r2-vision-only"]
    assert len(failed["last_lines"]) == 20
    assert failed["last_lines"][-1] == "fake failure of r2-vision-only: exiting 1"
    assert not any(line.startswith(PREFIX) for line in failed["last_lines"])
    assert jobs["r1-llm-only"]["last_lines"] == []
    assert jobs["r4-joint"]["output"].endswith("r4-joint/adapter") and jobs["r4-joint"]["final_loss"] == 0.5
    out = capsys.readouterr().out
    assert "r2-vision-only failed (exit 1); last lines of" in out
    assert "    fake failure of r2-vision-only: exiting 1" in out


def test_summary_falls_back_to_progress_lines_without_status_json(host, monkeypatch, capsys) -> None:
    host.set_behaviour(monkeypatch, {"*": {"status_json": False, "exit": 1, "steps": 4}})
    assert launch(host, "--recipes", "r1", "--gpus", "0") == 1
    (job,) = host.summary()["jobs"]
    assert job["final_loss"] == 0.4 and job["output"].endswith("r1-llm-only/adapter")
    assert job["status"] == "failed"


def test_r3_is_one_process_running_both_stages(host, capsys) -> None:
    assert launch(host, "--recipes", "r3", "--gpus", "0") == 0
    (record,) = host.records()
    assert record["recipe"] == "r3-two-stage"
    (job,) = host.summary()["jobs"]
    assert [stage["name"] for stage in job["stages"]] == ["stage1-vision", "stage2-llm"]
    assert job["output"].endswith("r3-two-stage/stage2-llm/adapter")
    out = capsys.readouterr().out
    assert "[r3-two-stage gpu0]" in out and "step 3/3 loss 0.5000 (stage2-llm)" in out


def test_logs_are_prefixed_live_and_kept_whole_per_recipe(host, monkeypatch, capsys) -> None:
    host.set_behaviour(monkeypatch, {"*": {"noise": 2}})
    assert launch(host, "--recipes", "r1,r2", "--gpus", "0,1") == 0
    out = capsys.readouterr().out
    assert "[r1-llm-only gpu0]    main step 2 line 1" in out  # a stderr line, merged
    assert "[r2-vision-only gpu1] step 3/3 loss 0.5000" in out  # progress, compact
    assert PREFIX not in out
    (launch_dir,) = host.launch_dirs()
    log = (launch_dir / "logs" / "r1-llm-only.log").read_text().splitlines()
    assert log[0].startswith("# command: ") and "--recipe r1-llm-only" in log[0]
    assert "main step 3 line 0" in log and "main step 3 line 1" in log
    assert sum(line.startswith(PREFIX) for line in log) == 6  # start, 3 steps, stage_end, end
    assert all(json.loads(line[len(PREFIX) :]) for line in log if line.startswith(PREFIX))
    assert {"logs", "r1-llm-only", "r2-vision-only", "summary.json"} <= {p.name for p in launch_dir.iterdir()}


def test_cpu_runs_every_recipe_at_once_with_threads_split(host, monkeypatch, capsys) -> None:
    host.set_gpus(monkeypatch, "none")  # no driver: --cpu must not need one
    host.set_behaviour(monkeypatch, {"*": {"step_s": 0.2}})
    assert launch(host, "--recipes", "r1,r2", "--cpu", "--threads", "4") == 0
    records = host.records()
    assert overlaps(*records)
    for record in records:
        assert "--cpu" in record["argv"] and flag_value(record["argv"], "--threads") == "2"
        assert record["env"]["OMP_NUM_THREADS"] == record["env"]["MKL_NUM_THREADS"] == "2"
        assert record["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert {j["device"] for j in host.summary()["jobs"]} == {"cpu"}


def test_wait_queues_until_a_busy_gpu_frees(host, monkeypatch, tmp_path, capsys) -> None:
    gpus = tmp_path / "gpus.json"
    gpus.write_text('[{"processes": [999]}]')
    host.set_gpus(monkeypatch, f"@{gpus}")
    freed_at = []

    def free_later() -> None:
        time.sleep(1.5)
        freed_at.append(time.time())
        gpus.write_text("[{}]")

    threading.Thread(target=free_later, daemon=True).start()
    assert launch(host, "--recipes", "r1", "--gpus", "0", "--wait") == 0
    (record,) = host.records()
    assert record["start"] >= freed_at[0]
    assert (
        "r1-llm-only waits for a GPU (gpu0 busy: 1 compute process(es) running (pid 999))"
        in capsys.readouterr().out
    )


def test_a_worker_that_cannot_start_fails_alone(host, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RECIPE_RUNNER_WORKER", json.dumps([str(host.tmp / "no-such-worker")]))
    assert launch(host, "--recipes", "r1", "--gpus", "0") == 1
    (job,) = host.summary()["jobs"]
    assert job["status"] == "failed" and job["exit_code"] is None
    assert "could not start" in job["error"] and "could not start" in job["last_lines"][0]
    assert holder(host.lease_dir, "GPU-fake-0000") is None


def test_every_launch_ends_with_a_report_that_can_be_rewritten(host, capsys) -> None:
    assert launch(host, "--recipes", "r1", "--gpus", "0") == 0
    (launch_dir,) = host.launch_dirs()
    report = launch_dir / "report.md"
    out = capsys.readouterr().out
    assert report.is_file() and f"report:  {report}" in out
    assert out.rstrip().splitlines()[-1].startswith("No recipe produced metrics")  # the fake scores nothing
    report.unlink()
    assert main(["report", str(launch_dir)]) == 0
    assert report.is_file()
    assert main(["report", str(host.tmp)]) == 2
    assert "no summary.json" in capsys.readouterr().err
