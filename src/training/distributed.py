"""Run one recipe as N data-parallel processes (DDP): what the launcher spawns for --gpus-per-recipe N.

    CUDA_VISIBLE_DEVICES=GPU-aaa,GPU-bbb python -m src.training.distributed --nproc-per-node 2 -- \
        --recipe r4 --output-dir outputs/r4 --batch-size 2 --grad-accum 4 --dataset DIR
    python -m src.training.distributed --nproc-per-node 2 -- --recipe r4 --cpu --threads 1 ...  # gloo

Everything after `--` is the worker's flags (`python -m src.training.worker --help`). Each rank runs
`src.training.worker.main` with them and holds a whole model on its own GPU (rank i on the i-th GPU of
CUDA_VISIBLE_DEVICES); the trainer splits every batch over the ranks and averages their gradients.
`--batch-size` and `--grad-accum` are per rank: N ranks take batch x accum x N samples per optimizer
step. `--threads` is per rank too (default: the CPU's cores divided among the ranks).

The flags are checked once, here, before any rank starts (exit 2, nothing written). Ranks start through
torch's elastic agent (standalone rendezvous on 127.0.0.1, no restarts); they share this process's
process group, so a signal to the group reaches each of them, and the agent forwards what it gets.
A rank that dies ends the whole group; collectives give up after RECIPE_RUNNER_DDP_TIMEOUT seconds
(src/training/config.py). The exit code is the worker's, from the rank that failed first
(3: CUDA out of memory, 2: bad input, 130: interrupted, 128+N: killed by signal N), and status.json
is corrected to say so when rank 0 could not (it was stopped because another rank failed, or killed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from src.contract import exits
from src.contract.env import FLAGS_CHECKED_ENV, NO_MULTICAST_ENV

MONITOR_SECONDS = 0.2  # how often the agent polls its ranks: how fast one rank's death ends the rest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.training.distributed",
        description="Train one recipe as N data-parallel processes; the worker's flags follow `--`.",
        epilog="Example: python -m src.training.distributed --nproc-per-node 2 -- --recipe r4 --dataset DIR",
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        required=True,
        help="data-parallel processes (ranks), one per visible GPU",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        print(
            "error: the worker's flags must follow `--`, e.g. --nproc-per-node 2 -- --recipe r4 ...",
            file=sys.stderr,
        )
        return exits.USAGE
    split = argv.index("--")
    nproc = build_parser().parse_args(argv[:split]).nproc_per_node
    worker_argv = argv[split + 1 :]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # until the agent installs its own
    try:
        worker_args, problems = check_worker_flags(nproc, worker_argv)
        if problems:
            print("error: " + "\nerror: ".join(problems), file=sys.stderr)
            return exits.USAGE
        prepare_environment(nproc, worker_args.gpu, worker_args.threads)
        code, failed_rank = launch(nproc, worker_argv)
    except KeyboardInterrupt:
        return exits.INTERRUPTED
    if code != exits.OK:
        correct_status(Path(worker_args.output_dir), code, failed_rank)
    return code


def check_worker_flags(nproc: int, worker_argv: list[str]):
    """(the worker's parsed flags, every problem with them and with --nproc-per-node)."""
    from src.training.worker import check_args, parse_worker_args

    args, recipe = parse_worker_args(worker_argv, prog="python -m src.training.distributed ... --")
    problems = check_args(args, recipe)
    if nproc < 1:
        problems.append(f"--nproc-per-node {nproc}: must be at least 1")
    visible = [gpu for gpu in (args.gpu or os.environ.get("CUDA_VISIBLE_DEVICES", "")).split(",") if gpu]
    if not args.cpu and visible and len(visible) < nproc:
        problems.append(
            f"--nproc-per-node {nproc}: only {len(visible)} GPU(s) visible ({','.join(visible)}); "
            "name one GPU per process in CUDA_VISIBLE_DEVICES, or lower --nproc-per-node"
        )
    return args, problems


def prepare_environment(nproc: int, gpu: str | None, threads: int | None) -> None:
    """What every rank inherits: its GPUs, no NVLink multicast, and a fair share of the CPU threads."""
    from src.utils.gpu import setup_gpus

    setup_gpus(gpu)  # the ranks skip --gpu: they see these GPUs and each takes its own
    os.environ[FLAGS_CHECKED_ENV] = "1"  # and skip the checks: rank 0 may be writing already
    for name, value in NO_MULTICAST_ENV.items():
        os.environ.setdefault(name, value)
    # N ranks with torch's default each would oversubscribe the cores N times.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // nproc)))


def run_rank(worker_argv: list[str]) -> int:
    """One rank: the worker, its exit code turned into the process's (the agent reads that)."""
    from src.training.worker import main as worker_main

    code = worker_main(worker_argv)
    if code != exits.OK:
        raise SystemExit(code)
    return code


def launch(nproc: int, worker_argv: list[str]) -> tuple[int, int | None]:
    """Start `nproc` ranks and wait for them: (exit code, the rank that failed first or None)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="rr-ddp-") as agent_logs:  # error files only, then gone
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"recipe-runner-{os.getpid()}",
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",  # port 0: the store takes a free port itself, no race
            local_addr="127.0.0.1",
            max_restarts=0,
            monitor_interval=MONITOR_SECONDS,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=agent_logs),
        )
        try:
            elastic_launch(config, run_rank)(worker_argv)
        except ChildFailedError as failed:
            return first_failure(failed.failures)
        except SignalException:
            return exits.INTERRUPTED, None
    return exits.OK, None


def first_failure(failures: dict) -> tuple[int, int]:
    """(exit code, rank) of the root cause among the failed ranks (rank -> ProcessFailure).

    The agent stamps failures found in one poll with the same second, so the time alone cannot tell
    which came first; among those, a rank that failed on its own (out of memory, bad input, a crash)
    goes before one that failed because a peer vanished from a collective (exit 1) or was stopped
    (130).
    """

    def order(item):
        rank, failure = item
        code = exit_code_of(failure.exitcode)
        return (failure.timestamp, code in (exits.FAILED, exits.INTERRUPTED), code == exits.INTERRUPTED, rank)

    rank, failure = min(failures.items(), key=order)
    return exit_code_of(failure.exitcode), rank


def exit_code_of(process_exitcode: int) -> int:
    """A process's exit code as a shell reports it: a death by signal N is 128 + N."""
    return 128 - process_exitcode if process_exitcode < 0 else process_exitcode


def correct_status(output: Path, code: int, failed_rank: int | None) -> None:
    """Make status.json name the group's outcome where rank 0's own record says otherwise."""
    from src.utils.files import read_json, write_json_atomic

    status = read_json(output / "status.json", None)
    if not status or (status.get("exit_code") == code and status.get("status") != "running"):
        return
    who = f"rank {failed_rank}" if failed_rank is not None else "the process group"
    rank0 = f"; rank 0: {status['error']}" if status.get("error") else ""
    status.update(
        status="interrupted" if code == exits.INTERRUPTED else "failed",
        exit_code=code,
        ended=status.get("ended") or time.time(),
        error=f"{who} ended the run with exit code {code}{rank0}",
        failed_rank=failed_rank,
    )
    write_json_atomic(output / "status.json", status)


if __name__ == "__main__":
    raise SystemExit(main())
