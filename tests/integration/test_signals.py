"""Signals to a launcher run as a subprocess: every child and grandchild ends, checked by PID."""

from __future__ import annotations

import json
import signal
import time

LONG = {"*": {"steps": 100000, "step_s": 0.05, "grandchild": True}}


def pids_of(records: list[dict]) -> list[int]:
    return [pid for r in records for pid in (r["pid"], r["grandchild"]) if pid]


def test_sigint_ends_children_and_grandchildren_and_exits_130(host, monkeypatch, helpers) -> None:
    host.set_behaviour(monkeypatch, LONG)
    launcher = host.launcher(
        "--recipes", "r1,r2,r4", "--gpus", "0,1", "--grace", "5", "--output-dir", str(host.out)
    )
    records = host.wait_for_records(2)
    pids = pids_of(records)
    assert len(pids) == 4 and all(helpers.alive(pid) for pid in pids)
    launcher.send_signal(signal.SIGINT)
    output, _ = launcher.communicate(timeout=20)
    assert launcher.returncode == 130, output
    assert helpers.wait_until(lambda: not any(helpers.alive(pid) for pid in pids), timeout=5)
    jobs = {j["recipe"]: j for j in host.summary()["jobs"]}
    assert jobs["r4-joint"]["status"] == "cancelled"  # queued, never started
    assert {jobs[k]["status"] for k in ("r1-llm-only", "r2-vision-only")} == {"interrupted"}
    assert len(host.records()) == 2
    assert "SIGINT received" in output


def test_sigterm_to_children_that_ignore_it_ends_in_sigkill_after_grace(host, monkeypatch, helpers) -> None:
    host.set_behaviour(monkeypatch, {"*": {**LONG["*"], "ignore_term": True}})
    launcher = host.launcher(
        "--recipes", "r1,r2", "--gpus", "0,1", "--grace", "1", "--output-dir", str(host.out)
    )
    pids = pids_of(host.wait_for_records(2))
    started = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=20)
    assert launcher.returncode == 143, output  # 128 + SIGTERM
    assert time.monotonic() - started >= 1.0  # the grace period was given
    assert helpers.wait_until(lambda: not any(helpers.alive(pid) for pid in pids), timeout=5)
    assert {j["exit_code"] for j in host.summary()["jobs"]} == {-signal.SIGKILL}


def test_second_ctrl_c_kills_without_waiting_for_grace(host, monkeypatch, helpers) -> None:
    host.set_behaviour(monkeypatch, {"*": {**LONG["*"], "ignore_term": True}})
    launcher = host.launcher("--recipes", "r1", "--gpus", "0", "--grace", "60", "--output-dir", str(host.out))
    pids = pids_of(host.wait_for_records(1))
    launcher.send_signal(signal.SIGINT)
    time.sleep(0.5)
    launcher.send_signal(signal.SIGINT)
    launcher.communicate(timeout=10)
    assert launcher.returncode == 130
    assert helpers.wait_until(lambda: not any(helpers.alive(pid) for pid in pids), timeout=5)


def test_sigkill_of_the_launcher_leaves_no_child_running(host, monkeypatch, helpers) -> None:
    # Silent workers: a chatty one would die anyway of SIGPIPE on its next line. No grandchild:
    # only the kernel acts once the launcher is SIGKILLed, and PDEATHSIG reaches its children.
    host.set_behaviour(monkeypatch, {"*": {"steps": 1, "step_s": 300, "ignore_term": True}})
    launcher = host.launcher("--recipes", "r1,r2", "--gpus", "0,1", "--output-dir", str(host.out))
    pids = pids_of(host.wait_for_records(2))
    assert all(helpers.alive(pid) for pid in pids)
    launcher.kill()
    launcher.communicate(timeout=10)
    assert helpers.wait_until(lambda: not any(helpers.alive(pid) for pid in pids), timeout=5)


def test_interrupted_summary_is_written(host, monkeypatch) -> None:
    host.set_behaviour(monkeypatch, LONG)
    launcher = host.launcher("--recipes", "r3", "--gpus", "0", "--grace", "5", "--output-dir", str(host.out))
    host.wait_for_records(1)
    launcher.send_signal(signal.SIGINT)
    launcher.communicate(timeout=20)
    summary = host.summary()
    assert summary["exit_code"] == 130
    (job,) = summary["jobs"]
    assert job["status"] == "interrupted" and job["stages"] == []
    assert json.dumps(summary)  # plain JSON all the way down
