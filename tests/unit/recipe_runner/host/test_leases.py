"""GPU leases: exclusive, named, reclaimed from dead holders; two launchers never share a GPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from recipe_runner.host.leases import holder, lease_dir, try_acquire

ROOT = Path(__file__).resolve().parents[4]


def test_a_lease_is_exclusive_and_names_its_holder(tmp_path) -> None:
    first = try_acquire(tmp_path, "GPU-abc", "recipe r1-llm-only launch L1")
    assert first is not None
    assert try_acquire(tmp_path, "GPU-abc", "recipe r2-vision-only launch L2") is None
    assert holder(tmp_path, "GPU-abc").endswith("recipe r1-llm-only launch L1")
    assert try_acquire(tmp_path, "GPU-other", "x") is not None  # one lease per GPU
    first.release()
    assert holder(tmp_path, "GPU-abc") is None
    again = try_acquire(tmp_path, "GPU-abc", "recipe r2-vision-only launch L2")
    assert again is not None
    again.release()


def test_holder_creates_nothing(tmp_path) -> None:
    assert holder(tmp_path / "absent", "GPU-abc") is None
    assert not (tmp_path / "absent").exists()


def test_a_lease_of_a_killed_process_is_reclaimed(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from recipe_runner.host.leases import try_acquire
        lease = try_acquire(Path({str(tmp_path)!r}), "GPU-abc", "recipe r4-joint launch dead")
        print("held" if lease else "refused", flush=True)
        time.sleep(300)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert f"pid {proc.pid} recipe r4-joint" in holder(tmp_path, "GPU-abc")
        assert try_acquire(tmp_path, "GPU-abc", "mine") is None
    finally:
        proc.kill()
        proc.wait()
    lease = try_acquire(tmp_path, "GPU-abc", "mine")
    assert lease is not None
    lease.release()


def test_lease_dir_from_env() -> None:
    assert str(lease_dir({"RECIPE_RUNNER_LEASE_DIR": "/x/y"})) == "/x/y"
    assert str(lease_dir({})) == "/tmp/recipe-runner-leases"


def test_two_launchers_at_once_never_put_two_recipes_on_one_gpu(host, monkeypatch) -> None:
    host.set_behaviour(monkeypatch, {"*": {"steps": 4, "step_s": 0.1}})
    args = ["--gpus", "0,1", "--wait", "--output-dir", str(host.out)]
    launchers = [host.launcher("--recipes", "r1,r2", *args), host.launcher("--recipes", "r3,r4", *args)]
    outputs = [launcher.communicate(timeout=60)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs
    records = host.records()
    assert len(records) == 4
    for a in records:
        for b in records:
            if a is not b and a["env"]["CUDA_VISIBLE_DEVICES"] == b["env"]["CUDA_VISIBLE_DEVICES"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)
    assert {r["env"]["CUDA_VISIBLE_DEVICES"] for r in records} <= {"GPU-fake-0000", "GPU-fake-0001"}
