"""A stand-in for `src.training.worker` in launcher tests: the worker's flags, scripted behaviour, no torch.

Run as `python tests/fakes/worker.py --recipe r1-llm-only --output-dir DIR [worker flags...]`; the
launcher tests point `RECIPE_RUNNER_WORKER` at it. What it does comes from env `FAKE_WORKER`, a JSON
object from recipe key (or "*" for every recipe) to behaviour:

    steps        progress steps per stage (3)          step_s       seconds per step (0.02)
    exit         exit code (0)                         status_json  write DIR/status.json (true)
    grandchild   start a sleeping grandchild (false)   ignore_term  ignore SIGTERM and SIGINT (false)
    noise        plain log lines per step, half on stderr (1)
    oom_above    exit 3 (CUDA OOM) while --batch-size is above this (none)
    oom_first    exit 3 (CUDA OOM) unless run with --resume, i.e. on the first try only (false)
    silent_s     print nothing for this long before the first step (0): a hung worker
    say          one extra line to print at start (e.g. a secret, to test masking)
    best_scale   the --lr-scale that scores best on the validation split (1.0): a search's trial scores
                 1 / (1 + |log3(lr-scale / best_scale)|), its validation loss the same, reversed
    fail_scale   exit 1 when run with this --lr-scale (a trial that fails)
    peak_gib     the GPU memory its allocator holds at its peak: status.json's `peak_gpu_reserved_gib`;
                 held to a RECIPE_RUNNER_GPU_BUDGET_MIB below it (a packed job, capped there) it exits 3
                 (CUDA OOM under its cap) at its first step instead, as the real worker does (none)

As a learning-rate search's trial (--eval-split validation, --pause-at N) it writes metrics.json with that
score and the split it stands for, and status.json with the validation loss; --eval-split test writes
metrics.json of the test split (the chosen run's final scoring).

With env `FAKE_WORKER_RECORDS=DIR` it writes `DIR/<recipe>-<pid>.json` at start (pid, argv, the
device env, its cores, grandchild pid, start time) and rewrites it with the end time before it exits, so tests
can check what each child was given and when it held its device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for the shared protocol

from src.contract.progress import format_event  # noqa: E402
from src.recipes import RECIPES  # noqa: E402

ENV_KEYS = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "NCCL_NVLS_ENABLE",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    "NVSHMEM_DISABLE_NVLS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "PYTHONUNBUFFERED",
    "PYTORCH_CUDA_ALLOC_CONF",
    "RECIPE_RUNNER_GPU_BUDGET_MIB",
)


def behaviour(recipe: str) -> dict:
    table = json.loads(os.environ.get("FAKE_WORKER", "{}"))
    return {
        "steps": 3,
        "step_s": 0.02,
        "exit": 0,
        "status_json": True,
        "noise": 1,
        **table.get("*", {}),
        **table.get(recipe, {}),
    }


def score_of(scale: float, plan: dict) -> float:
    """A trial's made-up validation score: best at the behaviour's best_scale, lower a factor of 3 away."""
    return round(1 / (1 + abs(math.log(scale / plan.get("best_scale", 1.0), 3))), 4)


def cpus() -> list[int] | None:
    """The cores this process may run on (the launcher's --pin-cpus), where the OS says."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def record(path: Path | None, data: dict) -> None:
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr-scale", type=float, default=1.0)
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--pause-at", type=int)
    argv = sys.argv[1:]
    ranks = 1
    if "--" in argv:  # as src.training.distributed: --nproc-per-node N -- WORKER FLAGS
        ranks, argv = int(argv[argv.index("--nproc-per-node") + 1]), argv[argv.index("--") + 1 :]
    args, _ = parser.parse_known_args(argv)
    recipe, out = RECIPES[args.recipe], Path(args.output_dir)
    plan = behaviour(recipe.name)
    if plan.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    grandchild = None
    if plan.get("grandchild"):
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]).pid
    records = os.environ.get("FAKE_WORKER_RECORDS")
    rec_path = Path(records) / f"{recipe.name}-{os.getpid()}.json" if records else None
    rec = {"recipe": recipe.name, "pid": os.getpid(), "argv": argv, "ranks": ranks, "grandchild": grandchild}
    rec |= {"env": {key: os.environ.get(key) for key in ENV_KEYS}, "start": time.time(), "cpus": cpus()}
    record(rec_path, rec)

    out.mkdir(parents=True, exist_ok=True)
    if plan.get("say"):
        print(plan["say"], flush=True)
    time.sleep(plan.get("silent_s", 0))
    first_try = "--resume" not in argv
    budget = os.environ.get("RECIPE_RUNNER_GPU_BUDGET_MIB")
    peak = plan.get("peak_gib")
    over_cap = peak is not None and budget is not None and peak * 1024 > int(budget)
    if (
        (plan.get("oom_above") is not None and args.batch_size > plan["oom_above"])
        or (plan.get("oom_first") and first_try)
        or over_cap
    ):
        print(f"torch.OutOfMemoryError: CUDA out of memory at batch {args.batch_size}", flush=True)
        record(rec_path, rec | {"end": time.time(), "exit": 3})
        return 3
    device = os.environ.get("CUDA_VISIBLE_DEVICES") or "cpu"
    stages = [stage.name for stage in recipe.stages] or ["main"]
    loss, done = None, []
    for stage in stages:
        print(
            format_event("start", recipe=recipe.name, stage=stage, device=device, pid=os.getpid()), flush=True
        )
        for step in range(1, plan["steps"] + 1):
            time.sleep(plan["step_s"])
            loss = round(2.0 / (step + 1), 4)
            for n in range(plan["noise"]):
                print(f"{stage} step {step} line {n}", file=sys.stderr if n % 2 else sys.stdout, flush=True)
            print(
                format_event(
                    "step",
                    recipe=recipe.name,
                    stage=stage,
                    step=step,
                    total=plan["steps"],
                    loss=loss,
                    gpu_mem_gib=None,
                ),
                flush=True,
            )
        output = str(out / stage / "adapter") if recipe.stages else str(out / "adapter")
        done.append(
            {
                "name": stage,
                "status": "succeeded",
                "output": output,
                "final_loss": loss,
                "steps": plan["steps"],
            }
        )
        print(
            format_event("stage_end", recipe=recipe.name, stage=stage, final_loss=loss, output=output),
            flush=True,
        )

    code = 1 if plan.get("fail_scale") == args.lr_scale else plan["exit"]
    status = "succeeded" if code == 0 else "failed"
    if code:
        print(f"fake failure of {recipe.name}: exiting {code}", file=sys.stderr, flush=True)
    print(format_event("end", recipe=recipe.name, status=status, final_loss=loss, exit_code=code), flush=True)
    if plan["status_json"]:
        (out / "status.json").write_text(
            json.dumps(
                {
                    "recipe": recipe.name,
                    "status": status,
                    "exit_code": code,
                    "device": {"name": device},
                    "final_loss": loss,
                    "output": done[-1]["output"],
                    "stages": done,
                    "val_loss": 1 - score_of(args.lr_scale, plan),
                    "paused": {"at": args.pause_at} if args.pause_at else None,
                    "reservation_gib": round(int(budget) / 1024, 2) if budget else None,
                    "peak_gpu_reserved_gib": peak,
                }
            )
        )
    if code == 0 and "--eval-split" in argv:  # a search's trial, or its chosen run's final scoring
        metrics = {"f1": score_of(args.lr_scale, plan), "eval": {"split": args.eval_split}}
        (out / "metrics.json").write_text(json.dumps(metrics))
    record(rec_path, rec | {"end": time.time(), "exit": code})
    return code


if __name__ == "__main__":
    raise SystemExit(main())
