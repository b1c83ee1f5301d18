"""`recipe-run --backend ray` against a Ray head started as users start it: `ray start --head` with the
installed Ray's defaults, the launcher run as a subprocess with nothing else set.

This host's token lives in a private HOME (`ray get-auth-token --generate`), so the head turns token
authentication on, as it does on any host where Ray has run before. The head gets the fake worker's hooks
in its own environment, as a real node gets secrets: the launcher's environment is not forwarded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FAKE_WORKER, REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A user's shell on this host: its own HOME (and so its own Ray token), no Ray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FAKE_WORKER", "RECIPE_RUNNER_"))}
    return {**env, "HOME": str(home), **extra}


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[dict]:
    ray = pytest.importorskip("ray")
    del ray
    home = tmp_path_factory.mktemp("head-home")
    records = tmp_path_factory.mktemp("records")
    env = user_env(
        home,
        FAKE_WORKER=json.dumps({"r1-llm-only": {"oom_above": 2, "steps": 5}, "*": {"steps": 5}}),
        FAKE_WORKER_RECORDS=str(records),
    )
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port = free_port()
    command = [RAY, "start", "--head", "--block", "--port", str(port), "--num-cpus", "4", "--num-gpus", "2"]
    command += ["--include-dashboard", "false", "--disable-usage-stats"]
    command += ["--ray-client-server-port", str(free_port())]
    started = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    address, lines = None, []
    deadline = time.monotonic() + 60
    while address is None and time.monotonic() < deadline and started.poll() is None:
        line = started.stdout.readline()
        lines.append(line)
        if found := re.search(r"ray start --address='([^']+)'", line):
            address = found.group(1)
    if address is None:
        started.kill()
        pytest.fail("ray start --head did not come up:\n" + "".join(lines[-30:]))
    try:
        yield {"address": address, "home": home, "records": records}
    finally:
        started.send_signal(signal.SIGTERM)  # --block: it stops its own processes, and only those
        try:
            started.wait(timeout=30)
        except subprocess.TimeoutExpired:
            started.kill()


def recipe_run(home: Path, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = user_env(home, RECIPE_RUNNER_WORKER=json.dumps([sys.executable, str(FAKE_WORKER)]))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "recipe_runner", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.monotonic() - started


def test_a_launch_through_the_head_retries_an_oom(head, tmp_path) -> None:
    out = tmp_path / "out"
    done, _ = recipe_run(
        head["home"],
        *("--recipes", "r1,r2", "--backend", "ray", "--ray-address", head["address"]),
        *("--batch-size", "4", "--output-dir", str(out), "--plain"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (launch,) = [p for p in out.iterdir() if p.is_dir()]
    jobs = {j["recipe"]: j for j in json.loads((launch / "summary.json").read_text())["jobs"]}
    assert {k: j["status"] for k, j in jobs.items()} == {
        "r1-llm-only": "succeeded",
        "r2-vision-only": "succeeded",
    }
    assert [(a["status"], a["batch_size"]) for a in jobs["r1-llm-only"]["attempts"]] == [("oom", "4")]
    tries = [json.loads(p.read_text()) for p in head["records"].glob("r1-llm-only-*.json")]
    assert sorted(t["exit"] for t in tries) == [0, 3]
    assert "out of GPU memory: retry 1 of 2 with --batch-size 2" in done.stdout


def test_a_head_that_refuses_this_hosts_token_exits_2_within_seconds(head, tmp_path) -> None:
    home = tmp_path / "other-home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0" * 64)
    out = tmp_path / "out"
    done, took = recipe_run(
        home,
        "--recipes",
        "r1",
        "--backend",
        "ray",
        "--ray-address",
        head["address"],
        "--output-dir",
        str(out),
    )
    assert done.returncode == 2 and took < 10, done.stderr
    assert "refused this launcher" in done.stderr and "auth_token" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_a_host_without_a_token_is_told_where_to_get_one(head, tmp_path) -> None:
    done, took = recipe_run(tmp_path, "--recipes", "r1", "--backend", "ray", "--ray-address", head["address"])
    assert done.returncode == 2 and took < 10, done.stderr
    assert "this host has no token" in done.stderr and "ray get-auth-token" in done.stderr


def test_an_unreachable_head_exits_2_within_seconds(tmp_path) -> None:
    done, took = recipe_run(
        tmp_path, "--recipes", "r1", "--backend", "ray", "--ray-address", f"127.0.0.1:{free_port()}"
    )
    assert done.returncode == 2 and took < 10, done.stderr
    assert "no Ray head answers there" in done.stderr and "ray start --head" in done.stderr
