"""A launcher on the Ray backend for the signal tests: `recipe-run --backend ray` with the fake worker.

    python tests/fakes/ray_launch.py --address HOST:PORT --launch-dir DIR --recipes r1,r2 [--grace S]

It plans the recipes with `tests/fakes/worker.py` as the worker, passes the FAKE_WORKER and
FAKE_WORKER_RECORDS hooks through each job's env (a Ray node runs workers with its own environment,
not the launcher's), runs them through the run loop on the Ray backend at ADDRESS, writes
DIR/summary.json and exits as `recipe-run` would (0, 1, or 128+N after signal N).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from recipe_runner.backends.loop import RunPolicy, run_jobs  # noqa: E402
from recipe_runner.backends.ray import RayBackend  # noqa: E402
from recipe_runner.planning.jobs import build_jobs  # noqa: E402
from recipe_runner.planning.request import resolve_recipes  # noqa: E402
from recipe_runner.results.live import PlainReporter  # noqa: E402
from recipe_runner.results.summary import launch_exit_code, write_summary  # noqa: E402
from src.contract.flags import TrainFlags  # noqa: E402

HOOKS = ("FAKE_WORKER", "FAKE_WORKER_RECORDS")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--launch-dir", required=True, type=Path)
    parser.add_argument("--recipes", required=True)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args()
    worker = [sys.executable, str(ROOT / "tests" / "fakes" / "worker.py")]
    hooks = {key: os.environ[key] for key in HOOKS if key in os.environ}
    specs = build_jobs(resolve_recipes(args.recipes), args.launch_dir, TrainFlags(), worker)
    specs = [replace(spec, env={**spec.env, **hooks}) for spec in specs]
    args.launch_dir.mkdir(parents=True, exist_ok=True)
    backend = RayBackend(args.address, gpus_per_job=1, cpu=False)
    results, signum = run_jobs(specs, backend, PlainReporter(sys.stdout), RunPolicy(grace_s=args.grace))
    code = launch_exit_code(results, signum)
    write_summary(args.launch_dir, "ray-test", results, code, sys.argv)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
