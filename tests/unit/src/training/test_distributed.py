"""Data parallelism on the CPU: the tiny model trained by two gloo ranks through
`python -m src.training.distributed`, as the launcher runs it for --gpus-per-recipe 2.

Checked: one run's files, written by rank 0 only; the batch split over the ranks (the same samples
per optimizer step as one process with the whole batch); a failing rank ending the group with its
own exit code; a signal to the process group ending every rank; bad input refused before any rank.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from safetensors.torch import load_file

from src.contract.env import FAULT_ENV, FAULT_RANK_ENV
from src.contract.progress import parse_line
from src.training.distributed import exit_code_of, first_failure
from tests.conftest import REPO

RUN_TIMEOUT = 180  # seconds; a run takes ~30 s on 2 idle cores, most of it two ranks importing


def _command(model_dir, data_dir, out, *extra, nproc: int = 2) -> list[str]:
    """Two CPU ranks, one thread each: 1 sample x 2 accumulation x 2 ranks = 4 samples a step."""
    return [
        sys.executable,
        "-m",
        "src.training.distributed",
        "--nproc-per-node",
        str(nproc),
        "--",
        "--recipe",
        "r4",
        "--cpu",
        "--threads",
        "1",
        "--model-id",
        str(model_dir),
        "--dataset",
        str(data_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--batch-size",
        "1",
        "--grad-accum",
        "2",
        "--skip-eval",
        "--no-wandb",
        "--save-steps",
        "0",
        *extra,
    ]


def _start(command: list[str], stderr_file: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """The run in its own process group (as the launcher starts it), tagged to find its processes.

    Stderr goes to a file: a pipe nobody reads while the test waits on stdout could fill and stall.
    """
    token = uuid.uuid4().hex
    with stderr_file.open("w") as stderr:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "RR_TEST_TOKEN": token, **env},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    return proc, token


def _finish(proc: subprocess.Popen, stderr_file: Path) -> tuple[str, str]:
    """(stdout, stderr) once the run has ended."""
    try:
        stdout, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return stdout, stderr_file.read_text()


def _processes_left(token: str, grace: float = 10.0) -> list[int]:
    """Live processes carrying the run's token, after up to `grace` seconds for them to go."""
    deadline = time.monotonic() + grace
    while True:
        left = []
        for process in psutil.process_iter():
            try:
                if (
                    process.status() != psutil.STATUS_ZOMBIE
                    and process.environ().get("RR_TEST_TOKEN") == token
                ):
                    left.append(process.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _events(stdout: str) -> list[dict]:
    return [event for event in map(parse_line, stdout.splitlines()) if event]


@pytest.mark.slow
def test_two_ranks_train_one_run_that_rank_0_alone_records(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "r4"
    proc, token = _start(_command(tiny_model_dir, tiny_data_dir, out), tmp_path / "stderr.txt")
    stdout, stderr = _finish(proc, tmp_path / "stderr.txt")
    assert proc.returncode == 0, stderr[-3000:]
    assert not _processes_left(token)

    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "succeeded" and status["exit_code"] == 0
    assert status["world_size"] == 2 and status["device"]["world_size"] == 2
    (stage,) = status["stages"]
    assert stage["steps"] == 3  # optimizer steps, not micro-batches or steps x ranks
    # Only rank 0 prints progress: one start, one end, one line per step, all from one process.
    events = _events(stdout)
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2 and starts[0]["pid"] == status["pid"]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert [e["event"] for e in events].count("end") == 1

    history = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2, 3]  # rank 1 wrote no rows of its own
    # The batch is split, not repeated: 1 sample x 2 accumulation x 2 ranks = 4 samples a step, as
    # one process with --batch-size 2 --grad-accum 2 takes; each rank reads its own half of the data.
    assert stage["samples_per_step"] == 4
    train_size = len((tiny_data_dir / "train" / "metadata.jsonl").read_text().splitlines())
    assert [row["epoch"] for row in history] == pytest.approx([4 * step / train_size for step in (1, 2, 3)])

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = {name: tensor for name, tensor in adapter.items() if "lora_B" in name}
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b.values()), (
        "LoRA B still at its zero init"
    )
    assert "[rank 1]" not in (out / "train.log").read_text()


@pytest.mark.slow
def test_a_failing_rank_ends_the_group_with_its_own_exit_code(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "r4"
    command = _command(tiny_model_dir, tiny_data_dir, out)
    started = time.monotonic()
    proc, token = _start(
        command, tmp_path / "stderr.txt", **{FAULT_ENV: "r4-joint:2:oom", FAULT_RANK_ENV: "1"}
    )
    _, stderr = _finish(proc, tmp_path / "stderr.txt")
    # Rank 1 runs out of memory: exit 3 (the launcher retries smaller), not torchrun's generic 1,
    # although rank 0 then fails too (its peer vanished from the all-reduce).
    assert proc.returncode == 3, stderr[-3000:]
    assert time.monotonic() - started < RUN_TIMEOUT
    assert not _processes_left(token), "a rank outlived the run"
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 3 and status["failed_rank"] == 1
    assert not (out / "adapter").exists()


@pytest.mark.slow
def test_a_signal_to_the_process_group_ends_every_rank(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "r4"
    command = _command(tiny_model_dir, tiny_data_dir, out, "--max-steps", "500")
    proc, token = _start(command, tmp_path / "stderr.txt")
    for line in proc.stdout:  # wait until both ranks train
        if (parse_line(line) or {}).get("event") == "step":
            break
    os.killpg(proc.pid, signal.SIGTERM)  # what the launcher does to stop a job
    _, stderr = _finish(proc, tmp_path / "stderr.txt")
    assert proc.returncode == 130, stderr[-3000:]
    assert not _processes_left(token), "a rank outlived the signal"
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and status["exit_code"] == 130


@pytest.mark.parametrize(
    "case, message",
    [
        ("no separator", "must follow `--`"),
        ("no processes", "--nproc-per-node 0"),
        ("bad dataset", "--dataset"),
        ("fewer GPUs than processes", "only 1 GPU(s) visible"),
    ],
)
def test_bad_input_exits_2_before_any_rank_starts(tiny_model_dir, tiny_data_dir, tmp_path, case, message):
    out = tmp_path / "out"
    command = _command(tiny_model_dir, tiny_data_dir, out)
    env = {**os.environ}
    if case == "no separator":
        command.remove("--")
    elif case == "no processes":
        command[command.index("--nproc-per-node") + 1] = "0"
    elif case == "bad dataset":
        command[command.index("--dataset") + 1] = str(tmp_path / "missing")
    else:
        command.remove("--cpu")
        env["CUDA_VISIBLE_DEVICES"] = "GPU-only-one"
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def _failure(exitcode: int, timestamp: int = 100) -> SimpleNamespace:
    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp)


def test_the_root_cause_rank_gives_the_exit_code():
    # Seen in one poll: rank 0 failed because its peer vanished (1), rank 1 ran out of memory (3).
    assert first_failure({0: _failure(1), 1: _failure(3)}) == (3, 1)
    assert first_failure({0: _failure(130), 1: _failure(1)}) == (1, 1)
    assert first_failure({0: _failure(1, timestamp=99), 1: _failure(3)}) == (1, 0)  # earlier wins
    assert first_failure({1: _failure(-9), 0: _failure(130)}) == (137, 1)
    assert exit_code_of(-15) == 143 and exit_code_of(2) == 2
