"""The run loop's policy, the same scenarios on both backends: local subprocesses on a fake two-GPU host,
and Ray actors on a local Ray with two logical GPUs (tests/conftest.py's `ray_address`).

Each scenario runs fake workers (tests/fakes/worker.py) through `run_jobs` and checks what happened to
them: the OOM retry with half the micro-batch, a hung job reported and ended, summary.json's source kept
true while running, failures kept apart, Ctrl-C ending every worker.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from io import StringIO

import pytest

from recipe_runner.backends.base import Backend
from recipe_runner.backends.gpu_pool import GpuPool
from recipe_runner.backends.local import LocalBackend
from recipe_runner.backends.loop import RunPolicy, run_jobs
from recipe_runner.host.gpus import probe_gpus
from recipe_runner.planning.jobs import build_jobs
from recipe_runner.results.live import PlainReporter
from src.contract.flags import TrainFlags
from tests.conftest import FAKE_WORKER, alive, wait_until

LONG = {"steps": 100000, "step_s": 0.05, "grandchild": True}


@pytest.fixture(params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def backend(request, host) -> Callable[[], Backend]:
    """A fresh backend of each kind: the same jobs, the same policy, different machinery."""
    if request.param == "ray":
        request.getfixturevalue("ray_address")
        from recipe_runner.backends.ray import RayBackend

        return lambda: RayBackend(None, gpus_per_job=1, cpu=False)
    gpus = probe_gpus()  # two fake GPUs (the host fixture)
    return lambda: LocalBackend(GpuPool(gpus, probe_gpus, host.lease_dir, "policy-test", max_jobs_per_gpu=1))


def specs_for(host, recipes: list[str], behaviour: dict, **flags) -> list:
    """Fake-worker jobs; the hooks ride in each job's env, since a Ray node does not see the launcher's."""
    hooks = {"FAKE_WORKER": json.dumps(behaviour), "FAKE_WORKER_RECORDS": str(host.records_dir)}
    planned = build_jobs(
        recipes, host.tmp / "launch", TrainFlags(**flags), [sys.executable, str(FAKE_WORKER)]
    )
    return [replace(spec, env={**spec.env, **hooks}) for spec in planned]


def run(backend: Callable[[], Backend], specs: list, **policy) -> tuple[list, int | None, list]:
    """The jobs through the run loop; also every snapshot of the results it reported while running."""
    snapshots: list = []
    policy = {"grace_s": 5.0, **policy}
    results, signum = run_jobs(
        specs, backend(), PlainReporter(StringIO()), RunPolicy(**policy), lambda now: snapshots.append(now)
    )
    return results, signum, snapshots


def test_an_oom_is_retried_with_half_the_micro_batch_and_succeeds(backend, host) -> None:
    specs = specs_for(
        host, ["r1-llm-only", "r2-vision-only"], {"r1-llm-only": {"oom_above": 2}}, batch_size=4, grad_accum=1
    )
    (r1, r2), signum, _ = run(backend, specs, oom_retries=2)

    assert signum is None and (r1.status, r2.status) == ("succeeded", "succeeded")
    assert [(a["status"], a["batch_size"], a["grad_accum"]) for a in r1.attempts] == [("oom", "4", "1")]
    tries = sorted((r for r in host.records() if r["recipe"] == "r1-llm-only"), key=lambda r: r["start"])
    assert [t["exit"] for t in tries] == [3, 0]
    retry = tries[1]["argv"]
    assert retry[retry.index("--batch-size") + 1] == "2" and retry[retry.index("--grad-accum") + 1] == "2"
    assert "--resume" in retry  # from its last checkpoint


def test_without_retries_an_oom_ends_the_job_as_oom(backend, host) -> None:
    specs = specs_for(host, ["r1-llm-only"], {"*": {"oom_above": 1}})
    (r1,), _, _ = run(backend, specs, oom_retries=0)
    assert (r1.status, r1.exit_code, r1.attempts) == ("oom", 3, [])


def test_a_hung_job_is_reported_and_ended_when_asked(backend, host) -> None:
    specs = specs_for(host, ["r1-llm-only", "r2-vision-only"], {"r1-llm-only": {"silent_s": 60}})
    (r1, r2), signum, _ = run(backend, specs, hang_timeout_s=1.0, kill_hung=True)

    assert signum is None and (r1.status, r2.status) == ("hung", "succeeded")
    (record,) = [r for r in host.records() if r["recipe"] == "r1-llm-only"]
    assert wait_until(lambda: not alive(record["pid"]), timeout=10)


def test_the_results_are_reported_while_the_jobs_run(backend, host) -> None:
    specs = specs_for(host, ["r1-llm-only", "r2-vision-only"], {"*": {"steps": 10, "step_s": 0.05}})
    results, _, snapshots = run(backend, specs)

    seen = [{r.name: r.status for r in snapshot} for snapshot in snapshots]
    assert seen[0] == {"r1-llm-only": "not started", "r2-vision-only": "not started"}
    assert any("running" in states.values() for states in seen)
    assert seen[-1] == {"r1-llm-only": "succeeded", "r2-vision-only": "succeeded"}
    assert [r.status for r in results] == ["succeeded", "succeeded"]


def test_one_failure_leaves_the_others_alone(backend, host) -> None:
    specs = specs_for(host, ["r1-llm-only", "r2-vision-only"], {"r1-llm-only": {"exit": 1}})
    (r1, r2), signum, _ = run(backend, specs, oom_retries=2)
    assert signum is None and (r1.status, r1.exit_code, r1.attempts) == ("failed", 1, [])
    assert r2.status == "succeeded"
    assert any("fake failure" in line for line in r1.last_lines)


def test_ctrl_c_ends_every_worker_and_cancels_what_waits(backend, host) -> None:
    specs = specs_for(host, ["r1-llm-only", "r2-vision-only", "r4-joint"], {"*": LONG})

    def interrupt() -> None:  # as a user's Ctrl-C, once two workers run (two GPUs: the third waits)
        if wait_until(lambda: len(host.records()) >= 2, timeout=30):
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    results, signum, _ = run(backend, specs)

    assert signum == signal.SIGINT
    statuses = sorted(r.status for r in results)
    assert statuses == ["cancelled", "interrupted", "interrupted"]
    pids = [pid for r in host.records() for pid in (r["pid"], r["grandchild"]) if pid]
    assert len(pids) == 4 and wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10)
