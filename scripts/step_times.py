"""Step times and throughput of every job of a launch, from the files the workers wrote (no torch).

    python scripts/step_times.py OUTPUT_DIR/LAUNCH_ID [--warmup 3] [--json]

For each job: its duration (summary.json), the median seconds between logged optimizer steps after
`--warmup` of them (loss_history.jsonl), the samples an optimizer step takes (micro-batch x accumulation
x data-parallel processes, from the job's command) and so samples/s, and the launch's makespan. The GPU
runs of docs/benchmarks.md are read with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe_runner.results.summary import read_summary  # noqa: E402
from src.contract.flags import flag_value  # noqa: E402


def step_seconds(history: Path, warmup: int) -> dict[str, float]:
    """Stage -> median seconds between consecutive logged steps, after `warmup` steps."""
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    per_stage: dict[str, list[float]] = {}
    for row in rows:
        per_stage.setdefault(row["stage"], []).append(row["time"])
    medians = {}
    for stage, times in per_stage.items():
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)][warmup:]
        if gaps:
            medians[stage] = statistics.median(gaps)
    return medians


def samples_per_step(argv: list[str]) -> int:
    batch = int(flag_value(argv, "--batch-size") or 4)
    accum = int(flag_value(argv, "--grad-accum") or 1)
    ranks = int(flag_value(argv, "--nproc-per-node") or 1)
    return batch * accum * ranks


def makespan_s(jobs: list[dict]) -> float | None:
    """From the first job's start to the last one's end (summary.json's ISO times)."""
    starts = [datetime.fromisoformat(j["started"]) for j in jobs if j.get("started")]
    ends = [datetime.fromisoformat(j["ended"]) for j in jobs if j.get("ended")]
    return round((max(ends) - min(starts)).total_seconds(), 1) if starts and ends else None


def rows_of(launch_dir: Path, warmup: int) -> list[dict]:
    summary = read_summary(launch_dir)
    if summary is None:
        raise SystemExit(f"{launch_dir}: no summary.json")
    rows = []
    for job in summary["jobs"]:
        history = Path(job["output_dir"]) / "loss_history.jsonl"
        medians = step_seconds(history, warmup) if history.is_file() else {}
        samples = samples_per_step(job["argv"])
        rows.append(
            {
                "job": job["name"],
                "device": job["device"],
                "status": job["status"],
                "started": job.get("started"),
                "duration_s": job["duration_s"],
                "samples_per_step": samples,
                "step_s": {stage: round(s, 4) for stage, s in medians.items()},
                "samples_s": {stage: round(samples / s, 2) for stage, s in medians.items()},
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launch_dir", type=Path)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = rows_of(args.launch_dir, args.warmup)
    makespan = makespan_s((read_summary(args.launch_dir) or {"jobs": []})["jobs"])
    if args.json:
        print(json.dumps({"jobs": rows, "makespan_s": makespan}, indent=1))
        return 0
    for row in rows:
        steps = ", ".join(
            f"{k} {v:.3f} s ({row['samples_s'][k]:.1f} samples/s)" for k, v in row["step_s"].items()
        )
        print(f"{row['job']:16} {row['device']:8} {row['status']:10} {row['duration_s']:7.1f} s  {steps}")
    print(f"makespan: {makespan} s (first start to last end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
