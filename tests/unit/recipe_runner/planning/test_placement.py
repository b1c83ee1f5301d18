"""Placement: jobs share a GPU while their planned peaks fit, the longest starts first, reservations are
respected by every launcher on the host, and a packed job that runs out of memory is retried alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from recipe_runner.cli.main import main
from recipe_runner.host.gpus import GpuInfo
from recipe_runner.host.leases import WHOLE_GPU, reservations, reserve, try_acquire
from recipe_runner.planning.placement import GpuRoom, choose_gpus, first_wave, reservation_mib, start_order
from src.contract.env import BUDGET_ENV
from src.contract.flags import flag_value

ROOT = Path(__file__).resolve().parents[4]
H200_MIB = 143771


def gpu(index: int, total: int = H200_MIB) -> GpuInfo:
    return GpuInfo(index, f"GPU-{index}", memory_total_mib=total)


def overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


# --- placement as data -----------------------------------------------------------------------------------


def test_jobs_share_a_gpu_while_their_reservations_fit() -> None:
    rooms = [GpuRoom(gpu(0), 100_000)]
    wave = first_wave([(1, 40_000)] * 3, [0, 0, 0], rooms, max_jobs=4)
    assert [bool(w) for w in wave] == [True, True, False]  # 80 GB placed, the third would make 120
    wave = first_wave([(1, 40_000)] * 3, [0, 0, 0], rooms, max_jobs=1)
    assert [bool(w) for w in wave] == [True, False, False]  # --max-jobs-per-gpu 1: no sharing


def test_idle_gpus_fill_before_any_two_jobs_share_one() -> None:
    rooms = [GpuRoom(gpu(0), 100_000), GpuRoom(gpu(1), 100_000)]
    wave = first_wave([(1, 10_000)] * 3, [0, 0, 0], rooms, max_jobs=4)
    assert [[g.index for g in w] for w in wave] == [[0], [1], [0]]


def test_the_longest_predicted_job_is_placed_first() -> None:
    assert start_order([50.0, 95.0, 0.0, 95.0]) == [1, 3, 0, 2]
    rooms = [GpuRoom(gpu(0), 100_000)]
    # the long job (index 2) gets the room; the two short ones would each have fit alone
    wave = first_wave([(1, 60_000), (1, 60_000), (1, 60_000)], [10.0, 20.0, 90.0], rooms, max_jobs=4)
    assert [bool(w) for w in wave] == [False, False, True]


def test_a_whole_gpu_job_needs_an_empty_gpu_and_blocks_it() -> None:
    busy = GpuRoom(gpu(0), 100_000, reserved_mib=5_000, jobs=1)
    assert choose_gpus([busy], 1, None, max_jobs=4) is None
    assert choose_gpus([busy, GpuRoom(gpu(1), 100_000)], 1, None, 4) == [gpu(1)]
    held = GpuRoom(gpu(0), 100_000).with_job(None)
    assert choose_gpus([held], 1, 1_000, 4) is None
    assert choose_gpus([GpuRoom(gpu(0), 100_000, blocked="busy: pid 9")], 1, 1_000, 4) is None


def test_a_reservation_is_the_planned_peak_with_margin_and_a_context() -> None:
    assert reservation_mib(45.0) > 45 * 1024 + 1000
    assert reservation_mib(45.0) < 45 * 1024 * 1.2 + 1100


# --- reservations shared by launchers --------------------------------------------------------------------


def test_reservations_add_up_to_the_capacity_and_whole_gpus_exclude(tmp_path) -> None:
    first = reserve(tmp_path, "GPU-a", "recipe r1 launch A", 60_000, 100_000)
    second = reserve(tmp_path, "GPU-a", "recipe r2 launch B", 30_000, 100_000)
    assert first and second
    assert reserve(tmp_path, "GPU-a", "recipe r4 launch B", 20_000, 100_000) is None  # 110 GB > 100
    assert try_acquire(tmp_path, "GPU-a", "whole") is None  # something is reserved there
    assert sorted(r.mib for r in reservations(tmp_path, "GPU-a")) == [30_000, 60_000]
    first.release()
    third = reserve(tmp_path, "GPU-a", "recipe r4 launch B", 20_000, 100_000)
    assert third is not None
    for lease in (second, third):
        lease.release()
    whole = try_acquire(tmp_path, "GPU-a", "whole")
    assert whole is not None and reservations(tmp_path, "GPU-a")[0].mib == WHOLE_GPU
    assert reserve(tmp_path, "GPU-a", "recipe r1", 1, 100_000) is None
    whole.release()
    assert reservations(tmp_path, "GPU-a") == []


def test_another_process_sees_the_reservation_and_a_dead_ones_stops_counting(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from recipe_runner.host.leases import reserve
        lease = reserve(Path({str(tmp_path)!r}), "GPU-a", "recipe r4 launch other", 70000, 100000)
        print("held" if lease else "refused", flush=True)
        time.sleep(300)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert [r.mib for r in reservations(tmp_path, "GPU-a")] == [70_000]
        assert reserve(tmp_path, "GPU-a", "mine", 40_000, 100_000) is None
        mine = reserve(tmp_path, "GPU-a", "mine", 30_000, 100_000)
        assert mine is not None
        mine.release()
    finally:
        proc.kill()
        proc.wait()
    assert reservations(tmp_path, "GPU-a") == []  # the kernel dropped the dead holder's lock
    lease = reserve(tmp_path, "GPU-a", "mine", 90_000, 100_000)
    assert lease is not None
    lease.release()


# --- the launcher ----------------------------------------------------------------------------------------


@pytest.fixture
def one_h200(host, monkeypatch, config_only_7b):
    host.set_gpus(monkeypatch, json.dumps([{"memory_total_mib": H200_MIB, "name": "NVIDIA H200"}]))
    model, data = config_only_7b
    return ["--gpus", "0", "--model-id", str(model), "--dataset", str(data), "--output-dir", str(host.out)]


def test_four_recipes_pack_onto_one_gpu_and_the_longest_starts_first(host, monkeypatch, one_h200, capsys):
    host.set_behaviour(monkeypatch, {"*": {"steps": 6, "step_s": 0.15}})
    assert main(["--recipes", "all", "--batch-size", "4", "--max-steps", "60", *one_h200]) == 0
    records = {r["recipe"]: r for r in host.records()}
    assert len(records) == 4
    # In the launcher's order of starting (the fakes' own clocks race: four Pythons start at once).
    starts = [line for line in capsys.readouterr().out.splitlines() if " started, pid " in line]
    assert len(starts) == 4 and starts[0].startswith("[r3-two-stage ")
    running_together = [
        (a, b) for a in records for b in records if a < b and overlaps(records[a], records[b])
    ]
    assert len(running_together) >= 3, running_together  # at least three ran side by side
    for record in records.values():
        assert flag_value(record["argv"], "--gradient-checkpointing") in ("on", "off")
        assert record["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        budget = int(record["env"]["RECIPE_RUNNER_GPU_BUDGET_MIB"])  # the worker keeps inside its share
        assert 20_000 < budget < H200_MIB // 2
    assert host.summary()["succeeded"] == 4


def test_plan_shows_who_shares_the_gpu_and_why(host, monkeypatch, one_h200, capsys):
    assert main(["plan", "--recipes", "all", "--batch-size", "4", *one_h200]) == 0
    out = capsys.readouterr().out
    assert out.count("shares it with") >= 3
    assert out.count("queued: starts when") <= 1
    assert out.count("placed:  reserves") == 4


def test_pack_off_runs_one_job_at_a_time_on_the_gpu(host, monkeypatch, one_h200, capsys):
    host.set_behaviour(monkeypatch, {"*": {"steps": 3, "step_s": 0.05}})
    assert main(["--recipes", "r1,r2", "--batch-size", "4", "--pack", "off", "--wait", *one_h200]) == 0
    a, b = host.records()
    assert not overlaps(a, b)


def test_a_packed_job_that_runs_out_of_memory_is_retried_alone(host, monkeypatch, one_h200, capsys):
    # r1 takes 0.3 s to run out of memory, so its first try surely overlaps r2 (not only in the plan).
    behaviour = {"*": {"steps": 6, "step_s": 0.1}, "r1-llm-only": {"oom_first": True, "silent_s": 0.3}}
    host.set_behaviour(monkeypatch, behaviour)
    assert main(["--recipes", "r1,r2", "--batch-size", "4", "--oom-retries", "1", *one_h200]) == 0
    tries = sorted((r for r in host.records() if r["recipe"] == "r1-llm-only"), key=lambda r: r["start"])
    other = next(r for r in host.records() if r["recipe"] == "r2-vision-only")
    assert len(tries) == 2 and overlaps(tries[0], other)  # it first ran beside r2
    assert not overlaps(tries[1], other)  # the retry had the GPU to itself
    assert flag_value(tries[1]["argv"], "--batch-size") == "4"  # same settings, not halved
    assert tries[0]["env"][BUDGET_ENV] is not None and tries[1]["env"][BUDGET_ENV] is None  # alone: uncapped
    r1 = next(j for j in host.summary()["jobs"] if j["recipe"] == "r1-llm-only")
    assert r1["status"] == "succeeded" and r1["attempts"][0]["retry"] == "alone on a GPU"


def test_a_packed_job_over_its_reservation_runs_out_under_its_cap_and_is_retried_alone_uncapped(
    host, monkeypatch, one_h200, capsys
):
    # r1 is alone on the GPU but holds a reservation, so its worker is capped there: the OOM is its own, and
    # the retry gets the GPU whole without the cap (not half the micro-batch, as for a job that ran whole).
    host.set_behaviour(monkeypatch, {"r1-llm-only": {"peak_gib": 100.0}})
    assert main(["--recipes", "r1", "--batch-size", "4", "--oom-retries", "1", *one_h200]) == 0
    first, retry = sorted(host.records(), key=lambda r: r["start"])
    budget = int(first["env"][BUDGET_ENV])
    assert first["exit"] == 3 and retry["exit"] == 0
    assert retry["env"][BUDGET_ENV] is None and "--resume" in retry["argv"]
    assert flag_value(retry["argv"], "--batch-size") == "4"
    (r1,) = host.summary()["jobs"]
    reserved = round(budget / 1024, 2)
    assert r1["status"] == "succeeded"
    assert r1["attempts"][0]["retry"] == "alone on a GPU" and r1["attempts"][0]["shared_gpu"] is False
    assert r1["attempts"][0]["reservation_gib"] == reserved
    # planned against measured: the reservation as planned, the uncapped retry's peak, and the excess
    assert (r1["reservation_gib"], r1["peak_gpu_reserved_gib"]) == (reserved, 100.0)
    assert r1["over_reservation_gib"] == round(100.0 - reserved, 2) > 0
    out = capsys.readouterr().out
    assert f"under its {budget / 1024:.1f} GiB reservation: retry 1 of 1 alone on a GPU, uncapped" in out
    assert f"r1-llm-only went {100.0 - reserved:.2f} GiB over its GPU memory reservation" in out


def test_packed_jobs_report_their_peak_beside_their_reservation(host, monkeypatch, one_h200, capsys):
    host.set_behaviour(monkeypatch, {"*": {"peak_gib": 12.5}})
    assert main(["--recipes", "r1,r2", "--batch-size", "4", *one_h200]) == 0
    budgets = {r["recipe"]: int(r["env"][BUDGET_ENV]) for r in host.records()}
    summary = host.summary()
    for job in summary["jobs"]:
        assert job["reservation_gib"] == round(budgets[job["recipe"]] / 1024, 2) > 12.5
        assert job["peak_gpu_reserved_gib"] == 12.5 and job["over_reservation_gib"] is None
        assert job["attempts"] == []
    assert "over its GPU memory reservation" not in capsys.readouterr().out
    report = (Path(summary["launch_dir"]) / "report.md").read_text()
    assert "GPU GiB held / reserved" in report
    assert f"| 12.50 / {budgets['r1-llm-only'] / 1024:.2f} |" in report


def test_ray_jobs_take_their_gpus_whole_and_would_pass_a_budget_unchanged() -> None:
    from recipe_runner.backends.ray import worker_env
    from recipe_runner.planning.placement import make_plan
    from recipe_runner.planning.request import LaunchRequest
    from src.contract.flags import TrainFlags

    request = LaunchRequest(("r1-llm-only", "r4-joint"), TrainFlags(), backend="ray")
    plan = make_plan(request, "L1", ["worker"], None, {}, cores=16)
    assert all(job.reserve_mib is None and BUDGET_ENV not in worker_env(job) for job in plan.jobs)
    packed = replace(plan.jobs[0], env={**plan.jobs[0].env, BUDGET_ENV: "20480"})
    assert worker_env(packed)[BUDGET_ENV] == "20480"  # the same contract as the local backend's


def test_gpus_per_recipe_runs_data_parallel_with_the_same_samples_a_step(host, monkeypatch, config_only_7b):
    host.set_gpus(monkeypatch, "2")
    model, data = config_only_7b
    flags = ["--model-id", str(model), "--dataset", str(data), "--output-dir", str(host.out)]
    assert (
        main(["--recipes", "r4", "--gpus-per-recipe", "2", "--batch-size", "4", "--grad-accum", "4", *flags])
        == 0
    )
    (record,) = host.records()
    assert record["ranks"] == 2
    assert record["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-fake-0000,GPU-fake-0001"
    assert (
        flag_value(record["argv"], "--batch-size") == "4"
        and flag_value(record["argv"], "--grad-accum") == "2"
    )


def test_an_uneven_data_parallel_split_is_refused(host, monkeypatch, capsys):
    host.set_gpus(monkeypatch, "4")
    code = main(
        ["--recipes", "r4", "--gpus-per-recipe", "3", "--batch-size", "4", "--output-dir", str(host.out)]
    )
    assert code == 2 and "cannot be split evenly over 3" in capsys.readouterr().err
    assert host.launch_dirs() == []


def test_make_plan_is_one_pure_step_from_request_to_placed_jobs() -> None:
    from recipe_runner.planning.estimates import MemoryEstimate
    from recipe_runner.planning.placement import make_plan
    from recipe_runner.planning.request import LaunchRequest
    from src.contract.flags import TrainFlags

    def memory(recipe: str, gib: float, train_s: float) -> MemoryEstimate:
        return MemoryEstimate(recipe, 4, 1, False, gib, 140.4, 0.5, train_s=train_s)

    plans = {
        "r1-llm-only": memory("r1-llm-only", 21.7, 30),
        "r2-vision-only": memory("r2-vision-only", 38.4, 32),
        "r3-two-stage": memory("r3-two-stage", 38.4, 63),
        "r4-joint": memory("r4-joint", 45.1, 33),
    }
    request = LaunchRequest(("r1-llm-only", "r2-vision-only", "r3-two-stage", "r4-joint"), TrainFlags())
    rooms = [GpuRoom(gpu(0), H200_MIB)]
    plan = make_plan(request, "L1", ["worker"], rooms, plans, cores=16)
    assert [job.recipe for job in plan.jobs] == list(request.recipes)  # the plan keeps the asked order
    placed = {job.recipe: bool(gpus) for job, gpus in zip(plan.jobs, plan.first_wave, strict=True)}
    # r3 (longest) first, then r4 and r2 while they fit; r1 waits for room
    assert placed == {"r1-llm-only": False, "r2-vision-only": True, "r3-two-stage": True, "r4-joint": True}
    assert all(job.reserve_mib == reservation_mib(plans[job.recipe].predicted_gib) for job in plan.jobs)
    assert all(flag_value(job.argv, "--threads") == "4" for job in plan.jobs)  # 16 cores / 3 at once, cap 4
    off = make_plan(LaunchRequest(request.recipes, TrainFlags(), pack="off"), "L2", ["w"], rooms, plans, 16)
    assert [bool(g) for g in off.first_wave] == [False, False, True, False]  # one at a time, r3 first
    assert all(job.reserve_mib is None for job in off.jobs)


def test_spare_gpus_go_to_the_longest_recipe_as_data_parallel(host, monkeypatch, config_only_7b, capsys):
    host.set_gpus(monkeypatch, json.dumps([{"memory_total_mib": H200_MIB}] * 4))
    model, data = config_only_7b
    flags = ["--model-id", str(model), "--dataset", str(data), "--output-dir", str(host.out)]
    long_run = ["--batch-size", "4", "--grad-accum", "4", "--max-steps", "500"]
    assert main(["plan", "--recipes", "r1,r3", *long_run, *flags]) == 0
    out = capsys.readouterr().out
    # r3 (two stages) is predicted longest: it gets the first spare GPU, r1 the next (16 splits by 2 and 4,
    # and r3 at 3 ranks would not split 16 samples evenly)
    blocks = {b.split(":")[0]: b for b in out.split("\n\n")[1:]}
    assert "--nproc-per-node 2 --" in blocks["r3-two-stage"] and "--grad-accum 2" in blocks["r3-two-stage"]
    assert "--nproc-per-node 2 --" in blocks["r1-llm-only"]
    assert "queued" not in out
    # an explicit --gpus-per-recipe 1 keeps one GPU each
    assert main(["plan", "--recipes", "r1,r3", "--gpus-per-recipe", "1", *long_run, *flags]) == 0
    assert "--nproc-per-node" not in capsys.readouterr().out
    # a short run stays on one GPU each: the ranks' start-up would cost more than they save
    assert main(["plan", "--recipes", "r1,r3", "--batch-size", "4", "--max-steps", "5", *flags]) == 0
    assert "--nproc-per-node" not in capsys.readouterr().out


def test_on_ray_a_recipe_with_several_gpus_runs_data_parallel_in_its_one_actor() -> None:
    from recipe_runner.planning.placement import make_plan
    from recipe_runner.planning.request import LaunchRequest
    from src.contract.flags import TrainFlags

    request = LaunchRequest(("r4-joint",), TrainFlags(grad_accum=4), backend="ray", gpus_per_recipe=2)
    (job,) = make_plan(request, "L", ["python", "-m", "src.training.worker"], None, {}, cores=8).jobs
    assert job.argv[:6] == ("python", "-m", "src.training.distributed", "--nproc-per-node", "2", "--")
    assert flag_value(job.argv, "--grad-accum") == "2" and job.gpu_count == 2
    sharded = make_plan(replace(request, shard=True), "L", ["w"], None, {}, cores=8).jobs[0]
    assert "--nproc-per-node" not in sharded.argv


def _planned(out: str, recipe: str) -> tuple[str, str]:
    """(command, memory line) of one recipe's job in `recipe-run plan`'s output."""
    block = out.split(f"\n{recipe}")[1].split("\n\n")[0]
    command = next(line for line in block.splitlines() if "command:" in line)
    memory = next(line for line in block.splitlines() if "memory:" in line)
    return command, memory


def _peak_gib(memory_line: str) -> float:
    return float(memory_line.split("predicted peak ")[1].split(" GiB")[0])


def test_the_plan_decides_whether_4bit_weights_are_dequantized_and_reserves_the_copies(
    host, monkeypatch, one_h200, capsys
):
    assert main(["plan", "--recipes", "r1,r2", *one_h200]) == 0
    out = capsys.readouterr().out
    command, memory = _planned(out, "r1-llm-only")
    assert "--dequantize-once on" in command and "dequantized once" in memory  # the copies fit an H200
    r2_command, _ = _planned(out, "r2-vision-only")
    assert "--dequantize-once" not in r2_command  # a bf16 recipe has nothing to dequantize
    assert main(["plan", "--recipes", "r1", "--dequantize-once", "off", *one_h200]) == 0
    command_off, memory_off = _planned(capsys.readouterr().out, "r1-llm-only")
    assert "--dequantize-once off" in command_off and "dequantized once" not in memory_off
    # 7B's LLM linears as bf16 copies: 2 bytes each of about 6.5 billion weights
    assert 10 < _peak_gib(memory) - _peak_gib(memory_off) < 16


def test_copies_that_do_not_fit_are_planned_away_and_the_step_predicted_slower(
    host, monkeypatch, config_only_7b, capsys
):
    host.set_gpus(monkeypatch, json.dumps([{"memory_total_mib": 24 * 1024, "name": "NVIDIA L4"}]))
    model, data = config_only_7b
    flags = ["--gpus", "0", "--model-id", str(model), "--dataset", str(data), "--output-dir", str(host.out)]
    assert main(["plan", "--recipes", "r1", *flags]) == 0
    command, memory = _planned(capsys.readouterr().out, "r1-llm-only")
    assert "--dequantize-once off" in command and "dequantized once" not in memory
    assert _peak_gib(memory) < 24
