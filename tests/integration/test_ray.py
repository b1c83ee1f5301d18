"""The Ray backend on a local Ray instance with two logical GPUs: fake workers, then the real one on CPU.

One Ray instance serves the session (`ray_address`, tests/conftest.py); each test builds JobSpecs whose
argv runs tests/fakes/worker.py and passes its FAKE_WORKER / FAKE_WORKER_RECORDS hooks through the job's env
(a Ray node runs workers in its own environment, not the launcher's). Without Ray installed only
the two tests that need no cluster run.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from recipe_runner.backends.loop import RunPolicy, run_jobs
from recipe_runner.backends.ray import (
    INSTALL_HINT,
    RayBackend,
    RayConnectError,
    RayUnavailable,
    check_reachable,
)
from recipe_runner.planning.jobs import build_jobs
from recipe_runner.results.live import PlainReporter
from recipe_runner.results.summary import read_worker_status
from src.contract.flags import TrainFlags

ROOT = Path(__file__).resolve().parents[2]
FAKE_WORKER = [sys.executable, str(ROOT / "tests" / "fakes" / "worker.py")]
RAY_LAUNCHER = [sys.executable, str(ROOT / "tests" / "fakes" / "ray_launch.py")]
LONG = {"*": {"steps": 100000, "step_s": 0.05, "grandchild": True}}
pytestmark = pytest.mark.ray


class Launch:
    """A launch directory of fake-worker jobs, and what those workers recorded."""

    def __init__(self, tmp: Path, helpers) -> None:
        self.helpers = helpers
        self.dir, self.records_dir = tmp / "launch", tmp / "records"
        self.records_dir.mkdir()
        self.out = io.StringIO()

    def specs(self, recipes: list[str], behaviour: dict, extra_env: dict | None = None) -> list:
        hooks = {"FAKE_WORKER": json.dumps(behaviour), "FAKE_WORKER_RECORDS": str(self.records_dir)}
        planned = build_jobs(recipes, self.dir, TrainFlags(), FAKE_WORKER)
        return [replace(spec, env={**spec.env, **hooks, **(extra_env or {})}) for spec in planned]

    def run(self, specs: list, lost_retries: int = 0) -> tuple[list, int | None]:
        return run_on_ray(specs, PlainReporter(self.out), lost_retries=lost_retries)

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.records_dir.glob("*.json"))]

    def wait_for_records(self, count: int, timeout: float = 30.0) -> list[dict]:
        found = self.helpers.wait_until(lambda: len(self.records()) >= count, timeout)
        assert found, f"expected {count} worker records, found {len(self.records())}"
        return self.records()

    def pids(self) -> list[int]:
        return [pid for r in self.records() for pid in (r["pid"], r["grandchild"]) if pid]


def run_on_ray(specs, reporter, cpu: bool = False, lost_retries: int = 0) -> tuple[list, int | None]:
    """The jobs through the run loop on the Ray backend, connected to the module's Ray."""
    policy = RunPolicy(grace_s=5.0, lost_retries=lost_retries)
    return run_jobs(specs, RayBackend(None, 1, cpu), reporter, policy)


@pytest.fixture
def launch(tmp_path: Path, helpers) -> Iterator[Launch]:
    found = Launch(tmp_path, helpers)
    yield found
    for pid in found.pids():  # a failing test must not leave sleeping fakes behind
        if helpers.alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_importing_the_backend_loads_no_ray() -> None:
    probe = "import sys, recipe_runner.backends.ray; print('ray' in sys.modules, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, launch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(RayUnavailable, match=r"pip install 'recipe-runner\[ray\]'"):
        launch.run([])
    assert INSTALL_HINT == "pip install 'recipe-runner[ray]'"


def test_an_address_where_no_head_answers_fails_fast(ray_address) -> None:
    check_reachable(ray_address)  # the module's Ray head answers
    started = time.monotonic()
    with pytest.raises(RayConnectError, match="ray start --head"):
        check_reachable("127.0.0.1:1")
    assert time.monotonic() - started < 6


def test_each_job_gets_its_own_gpu_and_r3_runs_as_one_process(ray_address, launch, helpers) -> None:
    recipes = ["r1-llm-only", "r2-vision-only", "r3-two-stage", "r4-joint"]
    # A device planned on the launcher's host must not reach a worker: the node's Ray picks it.
    specs = launch.specs(recipes, {"*": {"steps": 4, "step_s": 0.1}}, {"CUDA_VISIBLE_DEVICES": "GPU-local"})
    results, signum = launch.run(specs)

    assert signum is None
    assert [r.recipe for r in results] == recipes
    assert [r.status for r in results] == ["succeeded"] * 4
    records = launch.records()
    assert sorted(r["recipe"] for r in records) == sorted(recipes)  # r3: one process for both stages
    for record in records:
        env = record["env"]
        assert env["CUDA_VISIBLE_DEVICES"] in ("0", "1")
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["NCCL_NVLS_ENABLE"] == "0" and env["PYTHONUNBUFFERED"] == "1"
    for gpu in ("0", "1"):
        spans = sorted((r["start"], r["end"]) for r in records if r["env"]["CUDA_VISIBLE_DEVICES"] == gpu)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False)), spans
    by_recipe = {r.recipe: r for r in results}
    r3 = by_recipe["r3-two-stage"]
    (r3_record,) = [r for r in records if r["recipe"] == "r3-two-stage"]
    assert r3.device == f"gpu{r3_record['env']['CUDA_VISIBLE_DEVICES']}"
    assert [s["name"] for s in r3.stages] == ["stage1-vision", "stage2-llm"]
    r3_log = Path(r3.log).read_text()
    assert r3_log.count("RR_PROGRESS") == 13  # 2 x (start + 4 steps + stage_end) + end
    assert "stage2-llm step 4 line 0" in r3_log and "GPU-local" not in r3_log
    assert f"[r3-two-stage gpu{r3_record['env']['CUDA_VISIBLE_DEVICES']}]" in launch.out.getvalue()
    assert "(stage2-llm)" in launch.out.getvalue()  # progress events went through the reporter


def test_a_failing_recipe_leaves_the_others_alone(ray_address, launch, helpers) -> None:
    behaviour = {"*": {"steps": 3}, "r1-llm-only": {"exit": 1}, "r4-joint": {"exit": 3, "status_json": False}}
    specs = launch.specs(["r1-llm-only", "r2-vision-only", "r4-joint"], behaviour)
    results, signum = launch.run(specs)

    assert signum is None
    assert [(r.status, r.exit_code) for r in results] == [("failed", 1), ("succeeded", 0), ("oom", 3)]
    r1, r2, r4 = results
    assert r1.last_lines[-1] == "fake failure of r1-llm-only: exiting 1"
    assert "main step 3 line 0" in r1.last_lines
    assert r2.last_lines == [] and read_worker_status(Path(r2.output_dir))["status"] == "succeeded"
    assert r4.last_lines[-1] == "fake failure of r4-joint: exiting 3"
    for result in results:
        assert "main step 3 line 0" in Path(result.log).read_text()


def start_ray_launcher(ray_address: str, launch: Launch, behaviour: dict, *args: str) -> subprocess.Popen:
    env = {**os.environ, "FAKE_WORKER": json.dumps(behaviour), "FAKE_WORKER_RECORDS": str(launch.records_dir)}
    command = [*RAY_LAUNCHER, "--address", ray_address, "--launch-dir", str(launch.dir), *args]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_sigint_to_the_launcher_ends_every_worker_and_exits_130(ray_address, launch, helpers) -> None:
    launcher = start_ray_launcher(ray_address, launch, LONG, "--recipes", "r1,r2,r4")
    launch.wait_for_records(2)
    pids = launch.pids()
    assert len(pids) == 4 and all(helpers.alive(pid) for pid in pids)  # two workers, two grandchildren
    launcher.send_signal(signal.SIGINT)
    output, _ = launcher.communicate(timeout=30)

    assert launcher.returncode == 130, output
    assert helpers.wait_until(lambda: not any(helpers.alive(pid) for pid in pids), timeout=5)
    jobs = {j["recipe"]: j for j in json.loads((launch.dir / "summary.json").read_text())["jobs"]}
    # Ray places pending actors in no set order: which two of the three got the two GPUs varies.
    started = {record["recipe"] for record in launch.records()}
    (waiting,) = set(jobs) - started
    assert jobs[waiting]["status"] == "cancelled"  # waiting for a GPU, never started
    assert {jobs[k]["status"] for k in started} == {"interrupted"}
    assert {jobs[k]["exit_code"] for k in started} == {-signal.SIGINT}
    assert len(started) == 2 and "SIGINT received" in output


def test_sigterm_to_workers_that_ignore_it_ends_in_sigkill_and_143(ray_address, launch, helpers) -> None:
    behaviour = {"*": {**LONG["*"], "ignore_term": True}}
    launcher = start_ray_launcher(ray_address, launch, behaviour, "--recipes", "r1,r2", "--grace", "1")
    launch.wait_for_records(2)
    pids = launch.pids()
    started = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=30)

    assert launcher.returncode == 143, output
    assert time.monotonic() - started >= 1.0  # the grace period was given
    assert helpers.wait_until(lambda: not any(helpers.alive(pid) for pid in pids), timeout=5)
    jobs = json.loads((launch.dir / "summary.json").read_text())["jobs"]
    assert {j["exit_code"] for j in jobs} == {-signal.SIGKILL}


def kill_actor_of(launch: Launch, recipe: str) -> threading.Thread:
    """In the background: once `recipe`'s worker is writing, SIGKILL the Ray actor that runs it, as
    a node going down would end it."""

    def kill() -> None:
        output = launch.dir / recipe
        if launch.helpers.wait_until(lambda: bool(launch.records()) and output.exists(), timeout=30):
            (record,) = [r for r in launch.records() if r["recipe"] == recipe]
            os.kill(psutil.Process(record["pid"]).ppid(), signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_lost_actor_fails_its_recipe_and_the_launch_goes_on(ray_address, launch, helpers) -> None:
    behaviour = {
        "r1-llm-only": {"steps": 100000, "step_s": 0.05},
        "r2-vision-only": {"steps": 20, "step_s": 0.1},
    }
    specs = launch.specs(["r1-llm-only", "r2-vision-only"], behaviour)
    killer = kill_actor_of(launch, "r1-llm-only")
    started = time.monotonic()
    results, signum = launch.run(specs)
    killer.join()

    assert time.monotonic() - started < 30 and signum is None
    r1, r2 = results
    assert (r1.status, r1.exit_code) == ("failed", None)
    assert "lost on" in r1.error and "lost on" in r1.last_lines[-1]
    assert "lost on" in Path(r1.log).read_text()
    assert r2.status == "succeeded"
    (r1_record,) = [r for r in launch.records() if r["recipe"] == "r1-llm-only"]
    assert helpers.wait_until(lambda: not helpers.alive(r1_record["pid"]), timeout=5)  # died with its actor


def test_a_lost_actor_is_retried_when_asked(ray_address, launch, helpers) -> None:
    specs = launch.specs(["r1-llm-only"], {"*": {"steps": 15, "step_s": 0.1}})
    killer = kill_actor_of(launch, "r1-llm-only")
    (r1,), signum = launch.run(specs, lost_retries=1)
    killer.join()

    assert signum is None and (r1.status, r1.exit_code) == ("succeeded", 0)
    first, second = sorted(launch.records(), key=lambda r: r["start"])
    assert first["pid"] != second["pid"] and "end" not in first and second["exit"] == 0
    assert (launch.dir / "r1-llm-only.lost1").is_dir()  # the lost attempt's files, moved aside
    assert read_worker_status(launch.dir / "r1-llm-only")["status"] == "succeeded"
    log = Path(r1.log).read_text()
    assert "retry 1 of 1" in log and log.count("# command:") == 2


@pytest.mark.slow
def test_r1_and_r3_on_cpu_with_the_real_worker(
    ray_address, tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(ROOT)  # the worker runs `-m src.training.worker` in the launcher's directory
    flags = TrainFlags(
        model_id=str(tiny_model_dir), dataset=str(tiny_data_dir), max_steps=2, batch_size=2, no_wandb=True
    )
    worker = [sys.executable, "-m", "src.training.worker"]
    specs = build_jobs(["r1-llm-only", "r3-two-stage"], tmp_path / "launch", flags, worker, cpu_threads=1)
    out = io.StringIO()
    results, signum = run_on_ray(specs, PlainReporter(out), cpu=True)

    assert signum is None
    assert [r.status for r in results] == ["succeeded", "succeeded"], out.getvalue()[-4000:]
    for result in results:
        status = read_worker_status(Path(result.output_dir))
        assert status["status"] == "succeeded" and status["exit_code"] == 0
        assert result.device == "cpu" and isinstance(result.final_loss, float)
    r3 = results[1]
    assert [s["name"] for s in r3.stages] == ["stage1-vision", "stage2-llm"]
    assert (Path(r3.output) / "adapter_model.safetensors").is_file()
    assert Path(r3.log).read_text().count("RR_PROGRESS") >= 6
    assert "[r3-two-stage cpu]" in out.getvalue() and "(stage2-llm)" in out.getvalue()


def test_sigkill_of_the_launcher_leaves_no_worker_running(ray_address, launch, helpers) -> None:
    # Ray ends a dead driver's actors, and a worker dies with its actor (PR_SET_PDEATHSIG).
    behaviour = {"*": {"steps": 1, "step_s": 300, "ignore_term": True}}
    launcher = start_ray_launcher(ray_address, launch, behaviour, "--recipes", "r1,r2")
    launch.wait_for_records(2)
    pids = [r["pid"] for r in launch.records()]
    assert all(helpers.alive(pid) for pid in pids)
    launcher.kill()
    launcher.communicate(timeout=10)
    assert helpers.wait_until(lambda: not any(helpers.alive(pid) for pid in pids), timeout=30)


def test_cli_launch_on_ray_writes_the_same_summary_and_report(ray_address, host) -> None:
    from recipe_runner.cli.main import main

    code = main(
        [
            "--recipes",
            "r1,r3",
            "--backend",
            "ray",
            "--ray-address",
            ray_address,
            "--output-dir",
            str(host.out),
            "--plain",
        ]
    )
    assert code == 0
    (launch_dir,) = host.launch_dirs()
    summary = json.loads((launch_dir / "summary.json").read_text())
    assert [(j["recipe"], j["status"]) for j in summary["jobs"]] == [
        ("r1-llm-only", "succeeded"),
        ("r3-two-stage", "succeeded"),
    ]
    assert (launch_dir / "report.md").is_file() and (launch_dir / "logs" / "r3-two-stage.log").stat().st_size


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ray-address", "h:1"], "--ray-address needs --backend ray"),
        (["--backend", "ray", "--gpus", "0"], "Ray picks the GPUs"),
        (["--backend", "ray", "--ray-retries", "-1"], "--ray-retries -1"),
        (["--backend", "ray", "--ray-address", "127.0.0.1:1"], "no Ray head answers there"),
    ],
)
def test_cli_ray_usage_errors_exit_2_and_write_nothing(host, capsys, argv, message) -> None:
    from recipe_runner.cli.main import main

    assert main(["--recipes", "r1", *argv, "--output-dir", str(host.out)]) == 2
    assert message in capsys.readouterr().err
    assert not host.out.exists()
