"""Fixtures for the launcher tests: a fake GPU host, a fake worker, and cleanup of stray processes.

The `host` fixture points the launcher's testing hooks at fakes (RECIPE_RUNNER_FAKE_GPUS,
RECIPE_RUNNER_WORKER -> tests/fakes/worker.py) and its leases at a private directory, both for
in-process `main()` calls (monkeypatched env) and for launchers run as subprocesses (`host.env`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE_WORKER = ROOT / "tests" / "fakes" / "worker.py"


@dataclass
class FakeHost:
    tmp: Path
    env: dict[str, str]  # the whole environment for a launcher subprocess

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def records_dir(self) -> Path:
        return self.tmp / "records"

    @property
    def lease_dir(self) -> Path:
        return self.tmp / "leases"

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.records_dir.glob("*.json"))]

    def wait_for_records(self, count: int, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.records()
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"expected {count} worker records, found {len(self.records())}")

    def launch_dirs(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_dir()) if self.out.exists() else []

    def summary(self) -> dict:
        (launch,) = self.launch_dirs()
        return json.loads((launch / "summary.json").read_text())

    def launcher(self, *args: str, **kwargs) -> subprocess.Popen:
        """`python -m recipe_runner ARGS` as a subprocess of the test, output to one pipe."""
        return subprocess.Popen(
            [sys.executable, "-m", "recipe_runner", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **kwargs,
        )

    def set_behaviour(self, monkeypatch: pytest.MonkeyPatch, table: dict) -> None:
        monkeypatch.setenv("FAKE_WORKER", json.dumps(table))
        self.env["FAKE_WORKER"] = json.dumps(table)

    def set_gpus(self, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
        monkeypatch.setenv("RECIPE_RUNNER_FAKE_GPUS", value)
        self.env["RECIPE_RUNNER_FAKE_GPUS"] = value


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHost]:
    hooks = {
        "RECIPE_RUNNER_FAKE_GPUS": "2",
        "RECIPE_RUNNER_WORKER": json.dumps([sys.executable, str(FAKE_WORKER)]),
        "RECIPE_RUNNER_LEASE_DIR": str(tmp_path / "leases"),
        "FAKE_WORKER_RECORDS": str(tmp_path / "records"),
        "FAKE_WORKER": "{}",
    }
    (tmp_path / "records").mkdir()
    for key, value in hooks.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeHost(tmp_path, {**os.environ, **hooks})
    yield fake
    _kill_leftovers(fake)


def _kill_leftovers(fake: FakeHost) -> None:
    # A failing test must not leave sleeping fakes behind for the next one.
    for record in fake.records():
        for pid in (record.get("pid"), record.get("grandchild")):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped yet."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def helpers():
    """The plain helper functions, for tests that need them without importing conftest."""
    return type("Helpers", (), {"alive": staticmethod(alive), "wait_until": staticmethod(wait_until)})


@pytest.fixture(scope="session")
def config_only_7b(tmp_path_factory):
    """The published 7B shape as config.json alone (no weights: the planner never loads them),
    with Qwen's pixel limits, and 644x476 images (391 image tokens each)."""
    from src.data.synthetic import write_dataset
    from src.models.shapes import MAX_PIXELS, MIN_PIXELS, shape_config
    from src.models.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("plan7b")
    model = root / "7b"
    model.mkdir()
    shape_config("7b", build_tokenizer()).to_json_file(model / "config.json")
    (model / "preprocessor_config.json").write_text(
        json.dumps({"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})
    )
    data = write_dataset(root / "data", train=3, test=1, size=(644, 476))
    return model, data
