"""`recipe-run plan` predicts each recipe's peak GPU memory before anything starts, and
`--batch-size auto` turns into a concrete micro-batch per recipe (no torch: config.json only)."""

from __future__ import annotations

import contextlib
import io
import json

from recipe_runner.cli import main as cli
from src.contract.flags import AUTO_EFFECTIVE_BATCH, flag_value


def _plan(monkeypatch, capsys, gpu_mib: int, model, data, *extra: str) -> tuple[int, str]:
    monkeypatch.setenv(
        "RECIPE_RUNNER_FAKE_GPUS", json.dumps([{"index": 0, "uuid": "GPU-a", "memory_total_mib": gpu_mib}])
    )
    monkeypatch.delenv("RECIPE_RUNNER_WORKER", raising=False)
    argv = ["plan", "--recipes", "r1,r4", "--gpus", "0", "--model-id", str(model), "--dataset", str(data)]
    code = cli.main([*argv, *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_plan_predicts_each_recipe_and_turns_checkpointing_off_where_it_fits(
    config_only_7b, monkeypatch, capsys
):
    code, out = _plan(monkeypatch, capsys, 81559, *config_only_7b, "--batch-size", "4")
    assert code == 0
    memory = [line for line in out.splitlines() if line.strip().startswith("memory:")]
    assert len(memory) == 2 and all("fits" in line for line in memory)
    # On an 80 GB card both fit without recomputation; on 24 GB r4 needs it (measured 45 vs 18 GiB).
    assert all("checkpointing off" in line for line in memory)
    code, out = _plan(monkeypatch, capsys, 24576, *config_only_7b, "--batch-size", "4")
    r4 = [line for line in out.splitlines() if "memory:" in line][1]
    assert code == 0 and "checkpointing on" in r4 and "fits" in r4


def test_offloading_plans_and_passes_recompute_on(config_only_7b, monkeypatch, capsys):
    """--offload-activations moves what recompute keeps, so the plan is the recompute-on plan (on 80 GB
    both recipes would otherwise run with recompute off, as the test above shows) and each worker is
    told to offload."""
    code, out = _plan(
        monkeypatch, capsys, 81559, *config_only_7b, "--batch-size", "8", "--offload-activations"
    )
    assert code == 0
    memory = [line for line in out.splitlines() if line.strip().startswith("memory:")]
    assert len(memory) == 2 and all("checkpointing on" in line and "fits" in line for line in memory)
    assert all("offloaded" in line for line in memory)
    commands = [line.split("command: ")[1].split() for line in out.splitlines() if "command: " in line]
    assert len(commands) == 2 and all("--offload-activations" in argv for argv in commands)


def test_on_a_small_card_offloading_lets_batch_size_auto_run_a_larger_micro_batch(
    config_only_7b, monkeypatch
):
    monkeypatch.setenv("RECIPE_RUNNER_FAKE_GPUS", "none")
    model, data = config_only_7b
    argv = ["plan", "--recipes", "r4", "--model-id", str(model), "--dataset", str(data), "--gpu-memory", "23"]

    def auto_choice(*extra: str) -> str:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert cli.main([*argv, *extra]) == 0
        (row,) = [line for line in out.getvalue().splitlines() if line.startswith("r4-joint")]
        return row.split("fits")[1].strip()

    assert auto_choice().startswith("4 x 4, recompute on,")
    assert auto_choice("--offload-activations").startswith("8 x 2, recompute on, offloaded,")


def test_batch_size_auto_gives_each_worker_a_number_keeping_the_effective_batch(
    config_only_7b, monkeypatch, capsys
):
    code, out = _plan(monkeypatch, capsys, 81559, *config_only_7b, "--batch-size", "auto")
    assert code == 0
    commands = [line.split("command: ")[1].split() for line in out.splitlines() if "command: " in line]
    assert len(commands) == 2
    for argv in commands:
        batch, accum = int(flag_value(argv, "--batch-size")), int(flag_value(argv, "--grad-accum"))
        assert batch * accum == AUTO_EFFECTIVE_BATCH and batch > 1
        assert flag_value(argv, "--gradient-checkpointing") in ("on", "off")
    # a card too small for even one sample is refused before anything starts
    code, out = _plan(monkeypatch, capsys, 6144, *config_only_7b, "--batch-size", "auto")
    assert code == 2 and "does not fit a 6 GiB GPU" in out


def test_batch_size_auto_is_refused_where_no_gpu_memory_is_known(monkeypatch, capsys):
    code = cli.main(["plan", "--recipes", "r1", "--cpu", "--batch-size", "auto"])
    assert code == 2 and "--batch-size auto plans against one local GPU" in capsys.readouterr().err


def test_plan_for_gpus_this_machine_does_not_have(config_only_7b, monkeypatch, capsys):
    monkeypatch.setenv("RECIPE_RUNNER_FAKE_GPUS", "none")  # no driver, no NVML: it must not be asked
    model, data = config_only_7b
    argv = ["plan", "--recipes", "all", "--model-id", str(model), "--dataset", str(data)]
    assert cli.main([*argv, "--gpu-memory", "24", "--gpu-memory", "80"]) == 0
    rows = [
        line.split() for line in capsys.readouterr().out.splitlines() if line[:2] in ("r1", "r2", "r3", "r4")
    ]
    assert [(row[0], row[1]) for row in rows] == [
        (recipe, gib)
        for recipe in ("r1-llm-only", "r2-vision-only", "r3-two-stage", "r4-joint")
        for gib in ("24", "80")
    ]
    assert all("fits" in " ".join(row) for row in rows)
    r4_80 = " ".join(rows[-1])
    assert "(recompute off)" in r4_80 and "x" in r4_80.split("fits")[1]  # auto's micro-batch x accumulation
    assert cli.main([*argv, "--gpu-memory", "6"]) == 0
    assert "does not fit" in capsys.readouterr().out
    assert cli.main([*argv, "--gpu-memory", "0"]) == 2
    assert "--gpu-memory 0: give a size in GiB above 0" in capsys.readouterr().err


def test_max_pixels_reaches_the_workers_and_the_planner(config_only_7b, monkeypatch, capsys):
    # the same settings in both plans (the makespan may plan a recipe smaller to pack it: not with --pack off)
    same = ("--batch-size", "4", "--pack", "off")
    code, out = _plan(monkeypatch, capsys, 81559, *config_only_7b, *same)
    full = [float(line.split("peak ")[1].split()[0]) for line in out.splitlines() if "memory:" in line]
    code, out = _plan(monkeypatch, capsys, 81559, *config_only_7b, *same, "--max-pixels", "200704")
    small = [float(line.split("peak ")[1].split()[0]) for line in out.splitlines() if "memory:" in line]
    assert code == 0 and all(s < f for s, f in zip(small, full, strict=True))  # 256 tokens, not 391
    commands = [line.split() for line in out.splitlines() if "command: " in line]
    assert all(flag_value(argv, "--max-pixels") == "200704" for argv in commands)


def _memory_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip().startswith("memory:")]


def _seconds_a_step(line: str) -> float:
    return float(line.split("about ")[1].split(" s a step")[0])


def test_plan_says_which_runs_compile_and_counts_it_in_their_time(config_only_7b, monkeypatch, capsys):
    """--compile auto compiles long stages (src.planning.step_time.compile_chosen, the worker's own rule):
    the plan shows it, predicts the compiled step, and counts the compile time once per stage."""
    from src.planning.step_time import COMPILE_AUTO_MIN_STEPS, COMPILE_S

    def plan(*extra: str) -> tuple[list[str], list[float]]:
        code, out = _plan(monkeypatch, capsys, 143771, *config_only_7b, "--batch-size", "8", *extra)
        assert code == 0
        trained = [
            float(line.split("about ")[-1].split(" s of training")[0])
            for line in out.splitlines()
            if "of training predicted" in line
        ]
        return _memory_lines(out), trained

    short, _ = plan("--max-steps", str(COMPILE_AUTO_MIN_STEPS - 1))
    long, _ = plan("--max-steps", str(COMPILE_AUTO_MIN_STEPS))
    forced, forced_s = plan("--max-steps", "10", "--compile", "on")
    eager_10, eager_10_s = plan("--max-steps", "10")
    assert not any("compiled" in line for line in short + eager_10)
    assert all("compiled" in line for line in long) and all("compiled" in line for line in forced)
    for eager, compiled in zip(short, long, strict=True):
        assert _seconds_a_step(compiled) < _seconds_a_step(eager)
    # ten short steps: the compile time dominates what the compiled runs are predicted to take
    assert len(forced_s) == 2 and all(
        f > e + COMPILE_S / 2 for f, e in zip(forced_s, eager_10_s, strict=True)
    )
    assert not any("compiled" in line for line in plan("--max-steps", "5000", "--compile", "off")[0])
