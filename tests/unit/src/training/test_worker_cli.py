"""The worker's command line end to end (a subprocess, as the launcher runs it)."""

import json
import os
import subprocess
import sys

import pytest

from src.contract.progress import parse_line
from tests.conftest import REPO


def _worker(*args, env=None, timeout=300):
    command = [sys.executable, str(REPO / "scripts" / "train_recipe.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _common(tiny_model_dir, tiny_data_dir, out):
    return [
        "--cpu",
        "--model-id",
        tiny_model_dir,
        "--dataset",
        tiny_data_dir,
        "--output-dir",
        out,
        "--max-steps",
        2,
        "--batch-size",
        2,
    ]


@pytest.mark.slow
def test_r3_end_to_end_writes_status_history_log_and_outputs(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "r3"
    done = _worker("--recipe", "r3", "--no-wandb", *_common(tiny_model_dir, tiny_data_dir, out))
    assert done.returncode == 0, done.stderr[-2000:]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "succeeded" and status["exit_code"] == 0
    assert [s["name"] for s in status["stages"]] == ["stage1-vision", "stage2-llm"]
    assert status["output"] == str(out / "stage2-llm" / "adapter")
    assert (out / "stage1-vision" / "merged" / "config.json").is_file()
    assert (out / "stage2-llm" / "adapter" / "adapter_model.safetensors").is_file()
    history = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    assert [(h["stage"], h["step"]) for h in history] == [
        ("stage1-vision", 1),
        ("stage1-vision", 2),
        ("stage2-llm", 1),
        ("stage2-llm", 2),
    ]
    assert "step 2/2" in (out / "train.log").read_text()
    events = [e for e in map(parse_line, done.stdout.splitlines()) if e]
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "end"
    assert sum(e["event"] == "step" for e in events) == 4


@pytest.mark.slow
def test_logging_every_n_steps_keeps_every_steps_progress_and_the_last_loss(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    out = tmp_path / "r2"
    common = _common(tiny_model_dir, tiny_data_dir, out)
    common[common.index("--max-steps") + 1] = 3
    done = _worker("--recipe", "r2", "--no-wandb", "--skip-eval", "--logging-steps", 2, *common)
    assert done.returncode == 0, done.stderr[-2000:]
    history = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 3]  # every 2nd step, and the last
    steps = [e for e in map(parse_line, done.stdout.splitlines()) if e and e["event"] == "step"]
    assert [(e["step"], "loss" in e) for e in steps] == [(1, False), (2, True), (3, True)]
    assert json.loads((out / "status.json").read_text())["final_loss"] == history[-1]["loss"]


@pytest.mark.slow
def test_wandb_without_key_runs_offline_and_never_fails(tiny_model_dir, tiny_data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc credentials
    out = tmp_path / "r2"
    done = _worker("--recipe", "r2", *_common(tiny_model_dir, tiny_data_dir, out), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "status.json").read_text())["status"] == "succeeded"
    assert list(out.glob("wandb/offline-run-*")), "W&B did not log offline"


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--recipe", "r9", "invalid choice"),
        ("--max-steps", "0", "--max-steps 0"),
        ("--batch-size", "0", "--batch-size 0"),
        ("--model-id", "{tmp}/nowhere", "no config.json"),
        ("--dataset", "{tmp}/missing", "--dataset"),
        ("--checkpoint", "{data}", "not a stage-1 output"),
        ("--logging-steps", "0", "--logging-steps 0: must be at least 1"),
    ],
)
def test_bad_input_exits_2_with_one_clear_message_and_writes_nothing(
    tiny_model_dir, tiny_data_dir, tmp_path, flag, value, message
):
    out = tmp_path / "out"
    flags = {
        "--recipe": "r3",
        "--model-id": tiny_model_dir,
        "--dataset": tiny_data_dir,
        "--output-dir": out,
        "--max-steps": 2,
    }
    flags[flag] = value.format(tmp=tmp_path, data=tiny_data_dir)
    done = _worker("--cpu", "--no-wandb", *[item for pair in flags.items() for item in pair], timeout=120)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_offloading_without_recompute_is_refused(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    common = _common(tiny_model_dir, tiny_data_dir, out)
    done = _worker(
        "--recipe", "r4", "--no-wandb", *common, "--offload-activations", "--gradient-checkpointing", "off"
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--offload-activations with --gradient-checkpointing off" in done.stderr
    assert not out.exists()


def test_non_empty_output_dir_is_refused(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    done = _worker("--recipe", "r1", "--no-wandb", *_common(tiny_model_dir, tiny_data_dir, out), timeout=120)
    assert done.returncode == 2 and "not empty" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_custom_run_name_cannot_escape_the_output_directory(tmp_path):
    command = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        "--train-llm",
        "lora",
        "--name",
        "../../evil",
        "--cpu",
        "--no-wandb",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "--name '../../evil'" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, expected", [("auto", None), ("on", True), ("off", False)])
def test_compile_flag_reaches_the_run_options(flag, expected, tmp_path):
    from src.training.worker import build_parser, run_options

    args = build_parser().parse_args(["--recipe", "r4", "--compile", flag])
    assert run_options(args, "cuda", tmp_path, wandb_on=False).compile is expected


def test_compile_auto_is_on_only_for_long_gpu_runs(tmp_path):
    from src.planning.step_time import COMPILE_AUTO_MIN_STEPS
    from src.training.levers import resolve_compile
    from src.training.options import RunOptions

    def resolved(device: str, compile_flag=None, max_steps=-1, records=0) -> bool:
        opts = RunOptions("m", "d", tmp_path, device=device, compile=compile_flag, max_steps=max_steps)
        return resolve_compile(opts, records)

    long_run = COMPILE_AUTO_MIN_STEPS
    assert resolved("cuda", max_steps=long_run) and not resolved("cuda", max_steps=long_run - 1)
    assert not resolved("cpu", max_steps=10 * long_run)  # never on the CPU
    assert resolved("cpu", True) and not resolved("cuda", False, max_steps=long_run)  # as asked
    # from the epochs: 3 epochs of 4 samples a step over (long_run * 4 / 3) records is long_run steps
    assert resolved("cuda", records=long_run * 4 // 3) and not resolved("cuda", records=long_run // 3)


def test_varlen_vision_attention_follows_compilation_unless_asked(tmp_path):
    from src.training.levers import resolve_vision_varlen
    from src.training.options import RunOptions

    def resolved(device: str, asked=None, compiled=False) -> bool:
        opts = RunOptions("m", "d", tmp_path, device=device, vision_varlen_attention=asked)
        return resolve_vision_varlen(opts, compiled)

    assert resolved("cuda", compiled=True) and not resolved("cuda", compiled=False)  # the default
    assert resolved("cuda", True) and not resolved("cuda", False, compiled=True)  # as asked
    assert not resolved("cpu", True, compiled=True)  # the flash kernel is CUDA only


def test_host_positions_follow_compilation_unless_asked(tmp_path):
    from src.training.levers import resolve_host_positions
    from src.training.options import RunOptions

    def resolved(asked=None, compiled=False) -> bool:
        return resolve_host_positions(RunOptions("m", "d", tmp_path, host_positions=asked), compiled)

    assert resolved(compiled=True) and not resolved(compiled=False)  # the default
    assert resolved(True) and not resolved(False, compiled=True)  # as asked


def test_evaluation_covers_the_whole_test_split_by_default():
    from src.training.worker import build_parser

    args = build_parser().parse_args(["--recipe", "r4"])
    assert args.eval_samples == 0  # evaluate_after_training passes `eval_samples or None`: every image
    assert "whole test split" in build_parser().format_help()


@pytest.mark.slow
def test_lora_size_flags_set_the_adapter_and_are_recorded(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "r3-rank4"
    flags = ["--lora-rank", 4, "--lora-alpha", 8, "--lora-dropout", 0.0, "--skip-eval", "--no-wandb"]
    done = _worker("--recipe", "r3", *flags, *_common(tiny_model_dir, tiny_data_dir, out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "status.json").read_text())["lora"] == {"rank": 4, "alpha": 8, "dropout": 0.0}
    adapter = json.loads((out / "stage2-llm" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (4, 8, 0.0)  # both stages


def test_bad_lora_sizes_are_refused_naming_the_flag(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "bad"
    done = _worker(
        "--recipe",
        "r4",
        "--lora-rank",
        0,
        "--lora-dropout",
        1.5,
        *_common(tiny_model_dir, tiny_data_dir, out),
    )
    assert done.returncode == 2
    assert "--lora-rank 0: must be at least 1" in done.stderr and "--lora-dropout 1.5" in done.stderr
    assert not out.exists()


def test_a_packed_worker_is_capped_at_its_reservation_and_an_oom_there_is_its_own(
    monkeypatch, tmp_path, caplog
):
    """The one call site: the device resolved, the cap set once, status.json and the log say so, and an OOM
    under it exits 3 naming the cap (the launcher then runs it alone, uncapped)."""
    import logging
    import signal
    from types import SimpleNamespace

    import torch

    from src.contract import exits
    from src.contract.env import BUDGET_ENV
    from src.training import run as run_module
    from src.training.worker import parse_worker_args, run_worker

    fractions: list[tuple[float, int]] = []
    props = SimpleNamespace(name="NVIDIA H100", uuid="h100", total_memory=80 * 2**30)
    monkeypatch.setenv(BUDGET_ENV, str(20 * 1024))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: fractions.append((f, d))
    )

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run_module, "run_recipe", out_of_memory)
    args, recipe = parse_worker_args(["--recipe", "r1", "--output-dir", str(tmp_path), "--no-wandb"])
    term = signal.getsignal(signal.SIGTERM)  # run_worker installs its own
    try:
        with caplog.at_level(logging.INFO, logger="recipe-worker"):
            code = run_worker(args, recipe, tmp_path)
    finally:
        signal.signal(signal.SIGTERM, term)
    assert code == exits.OOM
    assert fractions == [(0.25, 0)]  # 20 GiB of 80, on its GPU, once
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["reservation_gib"] == 20.0 and status["status"] == "failed" and status["exit_code"] == 3
    assert "GPU memory capped at this job's reservation: 20.00 GiB (25.0% of the GPU)" in caplog.text
    assert "under this job's reservation cap (20.00 GiB): its own OOM" in caplog.text
