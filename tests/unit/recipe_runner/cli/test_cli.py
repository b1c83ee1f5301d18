"""The CLI surface: usage errors and unusable GPUs exit 2 with nothing started or written;
plan/--dry-run show the jobs without running them; list and gpus."""

from __future__ import annotations

import json

import pytest

from recipe_runner.cli.main import COMMANDS, main
from recipe_runner.host.leases import try_acquire
from src.contract.flags import flag_value


def assert_nothing_happened(host) -> None:
    assert host.records() == [], "a worker was started"
    assert not host.out.exists(), "the launch wrote files"
    assert not host.lease_dir.exists() or not any(host.lease_dir.iterdir()), "a lease was taken"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--recipes is required"),
        (["--recipes", "r1,r9"], "unknown recipe 'r9'"),
        (["--recipes", "r1", "--gpu", "0"], "did you mean --gpus?"),
        (["--recipes", "r1", "--epochs", "x"], "argument --epochs: invalid float value: 'x'"),
        (
            ["--recipes", "r1", "--batch-size", "2.5"],
            "argument --batch-size: '2.5' is not a whole number or auto",
        ),
        (["--recipes", "r1", "--cpu", "--gpus", "0"], "--cpu and --gpus exclude each other"),
        (["--recipes", "r1", "--gpus", "0,0"], "names a GPU twice"),
        (["--recipes", "r1", "--gpus-per-recipe", "0"], "--gpus-per-recipe 0: must be at least 1"),
        (["--recipes", "r1", "--max-steps", "0"], "--max-steps 0: must be at least 1, or -1"),
        (["--recipes", "r1", "--learning-rate", "3"], "--learning-rate 3.0: must be between 0 and 1"),
        (["--recipes", "r1", "--logging-steps", "0"], "--logging-steps 0: must be at least 1"),
        (
            ["--recipes", "r1", "--offload-activations", "--gradient-checkpointing", "off"],
            "--offload-activations with --gradient-checkpointing off: offloading moves the block inputs",
        ),
        (["train", "--recipes", "r1"], "unknown subcommand 'train'; choose from launch, plan"),
        (["plan", "--recipes", "r1", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2_with_one_clear_message(host, capsys, argv, message) -> None:
    assert main([*argv, "--output-dir", str(host.out)] if argv else []) == 2
    err = capsys.readouterr().err
    assert err.startswith("recipe-run: error: ")
    assert message in err
    assert "--help" in err  # and where to look for the fix
    assert_nothing_happened(host)


def test_every_problem_is_reported_at_once(host, capsys) -> None:
    assert main(["--recipes", "r9", "--gpus", "x", "--batch-size", "0", "--output-dir", str(host.out)]) == 2
    err = capsys.readouterr().err
    assert "r9" in err and "--gpus 'x'" in err and "--batch-size 0" in err


def test_help_explains_with_examples(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "recipe-run --recipes r1,r2,r4 --gpus 0,1,2" in out
    for command in COMMANDS:
        assert command in out
    assert main(["launch", "--help"]) == 0
    assert "--gpus-per-recipe" in capsys.readouterr().out


def test_busy_gpu_exits_2_naming_it_and_the_fix(host, monkeypatch, capsys) -> None:
    host.set_gpus(monkeypatch, '[{}, {"processes": [4242]}, {"memory_used_mib": 30000}]')
    assert main(["--recipes", "r1,r2", "--gpus", "0,1,2", "--output-dir", str(host.out)]) == 2
    err = capsys.readouterr().err
    assert "gpu1 (GPU-fake-0001) is busy: 1 compute process(es) running (pid 4242)" in err
    assert "gpu2 (GPU-fake-0002) is busy: 30000 MiB in use" in err
    assert "gpu0" not in err
    assert "--wait" in err
    assert_nothing_happened(host)


def test_absent_gpu_exits_2_even_with_wait(host, capsys) -> None:
    assert main(["--recipes", "r1", "--gpus", "0,5", "--wait", "--output-dir", str(host.out)]) == 2
    assert "no GPU with index 5 (this host has: 0, 1)" in capsys.readouterr().err
    assert_nothing_happened(host)


def test_gpu_leased_by_another_launcher_is_busy(host, capsys) -> None:
    lease = try_acquire(host.lease_dir, "GPU-fake-0001", "recipe r4-joint launch other")
    try:
        assert main(["--recipes", "r1", "--gpus", "1", "--output-dir", str(host.out)]) == 2
    finally:
        lease.release()
    assert "leased by another launcher (pid" in capsys.readouterr().err
    assert host.records() == [] and not host.out.exists()


def test_auto_without_free_gpus_exits_2(host, monkeypatch, capsys) -> None:
    host.set_gpus(monkeypatch, '[{"processes": [1]}]')
    assert main(["--recipes", "r1", "--output-dir", str(host.out)]) == 2
    assert "--gpus auto found 0 free GPU(s)" in capsys.readouterr().err
    assert_nothing_happened(host)


def test_no_driver_says_to_use_cpu(host, monkeypatch, capsys) -> None:
    host.set_gpus(monkeypatch, "none")
    assert main(["--recipes", "r1", "--output-dir", str(host.out)]) == 2
    err = capsys.readouterr().err
    assert "cannot list GPUs" in err and "--cpu" in err
    assert_nothing_happened(host)
    assert main(["gpus"]) == 1
    assert "--cpu" in capsys.readouterr().out


@pytest.mark.parametrize("form", [["plan"], ["launch", "--dry-run"], ["--dry-run"]])
def test_plan_prints_argv_and_env_and_starts_nothing(host, capsys, form) -> None:
    argv = [*form, "--recipes", "r1,r2,r3", "--gpus", "0,1", "--max-steps", "5", "--no-wandb"]
    assert main([*argv, "--output-dir", str(host.out)]) == 0
    out = capsys.readouterr().out
    assert "nothing started, nothing written" in out
    assert out.count("--recipe ") == 3 and "--recipe r3-two-stage" in out
    assert "--max-steps 5 --no-wandb" in out
    assert "r1-llm-only: gpu0 (GPU-fake-0000" in out and "r2-vision-only: gpu1 (GPU-fake-0001" in out
    assert "r3-two-stage: queued" in out
    assert "CUDA_VISIBLE_DEVICES=GPU-fake-0000" in out and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in out
    assert "NCCL_NVLS_ENABLE=0" in out and "NVSHMEM_DISABLE_NVLS=1" in out
    assert_nothing_happened(host)


def test_plan_on_cpu_shows_threads(host, capsys) -> None:
    assert main(["plan", "--recipes", "r1,r4", "--cpu", "--threads", "4", "--output-dir", str(host.out)]) == 0
    out = capsys.readouterr().out
    assert out.count("--cpu --threads 2") == 2 and "OMP_NUM_THREADS=2" in out and "cpu, 2 thread(s)" in out
    assert_nothing_happened(host)
    assert main(["plan", "--recipes", "r1", "--cpu", "--gpus", "auto", "--output-dir", str(host.out)]) == 0


def test_list_names_every_recipe_and_r3s_stages(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for key in ("r1-llm-only", "r2-vision-only", "r3-two-stage", "r4-joint"):
        assert key in out
    assert "stage1-vision -> stage2-llm" in out


def test_gpus_table_and_json(host, monkeypatch, capsys) -> None:
    host.set_gpus(monkeypatch, '[{"name": "NVIDIA H100"}, {"processes": [77], "memory_used_mib": 4000}]')
    assert main(["gpus"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["index", "name", "uuid"]
    assert "GPU-fake-0000" in out[1] and out[1].endswith("free")
    assert "77" in out[2] and "no: 1 compute process(es)" in out[2] and "4000/81559 MiB" in out[2]
    assert main(["gpus", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["free"] for r in records] == [True, False] and records[1]["processes"] == [77]


def test_lora_sizes_go_to_each_recipes_worker(monkeypatch, capsys, tiny_data_dir):
    monkeypatch.setenv("RECIPE_RUNNER_FAKE_GPUS", "2")
    argv = ["plan", "--recipes", "r1,r4", "--dataset", str(tiny_data_dir), "--lora-rank", "8"]
    argv += ["--lora", "r4:rank=64,alpha=128"]
    assert main(argv) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "command:" in line]
    r1, r4 = (line.split() for line in commands)
    assert flag_value(r1, "--lora-rank") == "8" and flag_value(r1, "--lora-alpha") is None
    assert flag_value(r4, "--lora-rank") == "64" and flag_value(r4, "--lora-alpha") == "128"
    assert main(["plan", "--recipes", "r1", "--lora", "r4:width=3"]) == 2
    assert "unknown key 'width'" in capsys.readouterr().err
