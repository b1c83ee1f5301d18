"""Time to report: the makespan model (jobs share a GPU's compute while they train, their fixed part overlaps
freely), and the lower-memory settings a launch takes only when they shorten it. Pure, no GPU."""

from __future__ import annotations

import json
import math

from recipe_runner.cli.main import main
from recipe_runner.host.gpus import GpuInfo
from recipe_runner.planning.makespan import MAKESPAN_GAIN, TimedJob, choose_settings, predict_makespan
from recipe_runner.planning.placement import GpuRoom
from src.contract.flags import flag_value

H100_MIB = 81559


def rooms(count: int = 1, mib: int = 80_000) -> list[GpuRoom]:
    return [GpuRoom(GpuInfo(i, f"GPU-{i}", memory_total_mib=mib), capacity_mib=mib) for i in range(count)]


def test_jobs_side_by_side_overlap_their_fixed_part_and_share_the_gpu_while_training():
    both = [TimedJob(30_000, 10.0, 10.0), TimedJob(30_000, 10.0, 10.0)]
    assert predict_makespan(both, rooms(), max_jobs=4) == 30.0  # 10 s loading together, 20 s training at half
    big = [TimedJob(50_000, 10.0, 10.0), TimedJob(50_000, 10.0, 10.0)]
    assert predict_makespan(big, rooms(), max_jobs=4) == 40.0  # no two fit: one after the other
    assert predict_makespan(big, rooms(2), max_jobs=4) == 20.0  # a GPU each
    assert predict_makespan(both, rooms(), max_jobs=1) == 40.0  # --pack off
    assert math.isinf(predict_makespan([TimedJob(90_000, 1.0, 1.0)], rooms(), max_jobs=4))


def test_the_longest_job_starts_first_and_a_short_one_fills_in_beside_it():
    jobs = [TimedJob(50_000, 5.0, 5.0), TimedJob(50_000, 5.0, 50.0), TimedJob(20_000, 5.0, 5.0)]
    # The 55 s job starts with the small one beside it: 5 s loading, 10 s training both at half speed (the
    # small one ends), 45 s alone; the other large one waits for it to end, then runs 10 s.
    assert predict_makespan(jobs, rooms(), max_jobs=4) == 5.0 + 10.0 + 45.0 + 10.0


def test_a_smaller_setting_is_taken_only_when_it_shortens_the_makespan_enough():
    gpu = rooms()

    def makespan_of(chosen):
        return predict_makespan(list(chosen.values()), gpu, max_jobs=4)

    fast, small = TimedJob(50_000, 30.0, 10.0), TimedJob(20_000, 30.0, 14.0)  # short runs: loading dominates
    chosen, seconds, fastest = choose_settings({"a": [fast, small], "b": [fast, small]}, makespan_of)
    # one at a time, 80 s; one small beside one fast: 30 s loading together, 20 s training at half (the fast
    # one ends), 4 s alone (both small would take 30 + 28 = 58 s)
    assert (
        fastest == 80.0
        and seconds == 54.0
        and sorted(chosen.values(), key=id) == sorted([fast, small], key=id)
    )
    fast, small = TimedJob(50_000, 30.0, 300.0), TimedJob(20_000, 30.0, 420.0)  # long runs: steps dominate
    chosen, seconds, fastest = choose_settings({"a": [fast, small], "b": [fast, small]}, makespan_of)
    assert chosen == {"a": fast, "b": fast} and seconds == fastest
    assert MAKESPAN_GAIN > 0  # a gain within the model's error never leaves the fastest settings


def _plan(host, monkeypatch, config_only_7b, capsys, steps: int) -> str:
    host.set_gpus(monkeypatch, json.dumps([{"memory_total_mib": H100_MIB, "name": "NVIDIA H100 80GB HBM3"}]))
    model, data = config_only_7b
    flags = ["--gpus", "0", "--model-id", str(model), "--dataset", str(data), "--output-dir", str(host.out)]
    assert main(["plan", "--recipes", "all", "--max-steps", str(steps), *flags]) == 0
    return capsys.readouterr().out


def test_a_short_launch_on_80gb_plans_some_recipes_smaller_so_that_they_run_side_by_side(
    host, monkeypatch, config_only_7b, capsys
):
    out = _plan(host, monkeypatch, config_only_7b, capsys, steps=10)
    line = next(line for line in out.splitlines() if line.startswith("predicted makespan"))
    assert "planned smaller than their fastest setting" in line
    smaller = [name for name in ("r1-llm-only", "r2-vision-only", "r3-two-stage", "r4-joint") if name in line]
    assert smaller
    block = out.split(f"\n{smaller[0]}")[1].split("\n\n")[0]
    assert "so that jobs run side by side" in block  # its memory line says why
    command = next(row for row in block.splitlines() if "command:" in row).split()
    assert flag_value(command, "--gradient-checkpointing") == "on"  # what its smaller setting is
    assert out.count("shares it with") >= 2  # they start together on the one GPU


def test_a_long_launch_keeps_every_recipe_at_its_fastest_setting(host, monkeypatch, config_only_7b, capsys):
    out = _plan(host, monkeypatch, config_only_7b, capsys, steps=1000)
    assert "every recipe at its fastest setting" in out and "side by side instead" not in out


def test_a_packed_job_reserves_what_its_evaluation_needs_when_training_needs_less(
    host, monkeypatch, config_only_7b, capsys
):
    # 7B r1 at its smallest (4-bit, micro-batch 1, recompute) trains in a few GiB, but evaluates on the bf16
    # model (15.5 GiB) in the same process, capped at the reservation: it must reserve that.
    from src.planning.evaluation import eval_peak_bytes
    from src.planning.parameters import ModelShape

    host.set_gpus(monkeypatch, json.dumps([{"memory_total_mib": H100_MIB, "name": "NVIDIA H100 80GB HBM3"}]))
    model, data = config_only_7b
    small = [
        "--batch-size",
        "1",
        "--grad-accum",
        "16",
        "--gradient-checkpointing",
        "on",
        "--dequantize-once",
        "off",
    ]
    flags = ["--recipes", "r1", "--gpus", "0", "--model-id", str(model), "--dataset", str(data), *small]

    def reserved_gib(*extra: str) -> float:
        assert main(["plan", *flags, "--output-dir", str(host.out), *extra]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if "placed:" in line)
        return float(line.split("reserves ")[1].split(" GiB")[0])

    weights = eval_peak_bytes(ModelShape.from_model_dir(model), 391 + 88, 88) / 2**30
    assert weights > 15.0
    assert reserved_gib() >= weights * 1.05  # evaluation's peak, with the margin
    assert reserved_gib("--skip-eval") < 10.0  # no evaluation: training's few GiB
