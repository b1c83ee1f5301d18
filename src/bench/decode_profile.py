"""Where one decoding batch's time goes: the evaluation decoding bench's `--profile` (src/bench/decoding.py).

    python -m src.bench.decoding --shape 7b --image-sizes mixed --paths sorted --profile sorted \\
        --out eval-bench

After a path's timed run, its first batch (the first `batch` images in the path's own order) is decoded
twice more: once with a clock at every generate() step (a LogitsProcessor that synchronises the GPU and
stamps the time; no profiler), which splits prefill (the first step: vision tower and prompt) from the
decoding steps, and once under torch.profiler (CPU and CUDA activities on a GPU, CPU alone on the CPU).
Writes OUT/profile-decode-<path>.txt (the profiler's top tables) and OUT/profile-decode-<path>.json.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from src.bench.measure import synchronize

TOP_OPS = 15
TABLE_ROWS = 30


def step_clock():
    """A LogitsProcessor that stamps the time (after a GPU sync) at each generate() step; generate()
    calls it once a step, after the step's forward, so stamp i - stamp i-1 is step i."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.calls: list[list[float]] = []  # per generate() call: its start, then each step's end

        def begin(self) -> None:
            synchronize()
            self.calls.append([time.perf_counter()])

        def __call__(self, input_ids, scores):
            synchronize()
            self.calls[-1].append(time.perf_counter())
            return scores

    return StepClock()


def step_times(calls: list[list[float]]) -> dict:
    """Prefill (each call's first step) and decoding steps (the rest), in milliseconds."""
    prefill = [(stamps[1] - stamps[0]) * 1e3 for stamps in calls if len(stamps) > 1]
    decode = [(b - a) * 1e3 for stamps in calls for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    return {
        "prefill_ms": round(statistics.fmean(prefill), 2) if prefill else None,
        "decode_ms_median": round(statistics.median(decode), 2) if decode else None,
        "decode_ms_min": round(min(decode), 2) if decode else None,
        "decode_ms_max": round(max(decode), 2) if decode else None,
        "decode_steps": len(decode),
        "decode_ms": [round(ms, 2) for ms in decode],
    }


def first_batch(processor, records: list, sort_by_size: bool, batch: int) -> list:
    """The records of a path's first generate() call: its first `batch` in the order it decodes them."""
    from src.eval.predict import batching_order

    order = (batching_order(processor, records) if sort_by_size else None) or list(range(len(records)))
    return [records[i] for i in order[: min(len(records), batch)]]


def profile_path(name: str, model, processor, records: list, run: dict, batch: int, out: Path) -> dict:
    """Profile path `name`'s first batch (`run`: predict_records' keyword arguments of the timed run;
    `batch`: the batch size it used). Writes OUT/profile-decode-<name>.txt/.json; returns the json's dict."""
    import torch

    from src.bench.measure import (
        SyncSites,
        gpu_idle_share,
        gpu_time_by_kind,
        host_ops,
        idle_gaps,
        kernel_intervals,
    )
    from src.bench.targets import image_size_counts
    from src.eval.predict import GenerationStats, predict_records

    chunk = first_batch(processor, records, run["sort_by_size"], batch)
    once = {**run, "batch_size": len(chunk), "sort_by_size": False}
    clock = step_clock()
    with _clocked(model, clock):
        predict_records(model, processor, chunk, **once)
    cuda = run["device"].startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    stats, syncs = GenerationStats(), SyncSites()
    synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        syncs.start()
        started = time.perf_counter()
        predict_records(model, processor, chunk, stats=stats, **once)
        synchronize()
        wall = time.perf_counter() - started
        syncs.stop()
    averages = profiler.key_averages()
    sort_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    text = (
        f"# decoding path {name}: {len(chunk)} images, one generate() call, {stats.decoding_steps} steps\n\n"
    )
    text += averages.table(sort_by=sort_key, row_limit=TABLE_ROWS, max_name_column_width=90)
    if cuda:
        text += "\n" + averages.table(
            sort_by="self_cpu_time_total", row_limit=TABLE_ROWS, max_name_column_width=90
        )
    kernels = kernel_intervals(profiler) if cuda else []
    idle = gpu_idle_share(kernels)
    busy_us = None
    if idle is not None:  # the union of the kernels' intervals: measure's idle share turned back into time
        busy_us = (1 - idle) * (max(end for _, end in kernels) - min(start for start, _ in kernels))
    steps = max(1, stats.decoding_steps)
    summary = {
        "path": name,
        "images": len(chunk),
        "image_sizes": image_size_counts([[(r.width, r.height)] for r in chunk]),
        "device": run["device"],
        "decode": run["decode"],
        "wall_s": round(wall, 4),
        "generate_s": round(stats.generate_seconds, 4),
        "decoding_steps": stats.decoding_steps,
        "ms_per_step": round(stats.generate_seconds / steps * 1e3, 3),
        "wall_ms_per_step": round(wall / steps * 1e3, 3),
        "gpu_busy_share": round(busy_us / (wall * 1e6), 4) if busy_us is not None else None,
        "gpu_busy_share_of_generate": _share(busy_us, stats.generate_seconds),
        "gpu_idle_share_between_kernels": idle,
        "kernels": len(kernels),
        "gpu_ms_by_kind": gpu_time_by_kind(profiler) if cuda else {},
        "idle_gaps": idle_gaps(kernels, host_ops(profiler)) if cuda else None,
        "host_syncs": syncs.total,
        "sync_sites": syncs.top(),
        "steps_unprofiled": step_times(clock.calls),
        "top_self_cuda": _top(averages, "self_device_time_total") if cuda else [],
        "top_self_cpu": _top(averages, "self_cpu_time_total"),
        "note": "ms_per_step: the profiled generate() call over its steps (prefill included; the profiler "
        "slows host-bound steps); steps_unprofiled: the same batch timed step by step without the profiler.",
    }
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-decode-{name}.txt").write_text(text)
    (out / f"profile-decode-{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


class _clocked:
    """Within it, model.generate() also runs `clock` as a logits processor at every step."""

    def __init__(self, model, clock):
        self.model, self.clock = model, clock

    def __enter__(self):
        from transformers import LogitsProcessorList

        original, clock = self.model.generate, self.clock

        def generate(*args, **kwargs):
            clock.begin()
            return original(*args, logits_processor=LogitsProcessorList([clock]), **kwargs)

        self.model.generate = generate
        return clock

    def __exit__(self, *exc):
        del self.model.generate  # the class's method again


def _top(averages, attribute: str, count: int = TOP_OPS) -> list[dict]:
    ranked = sorted(averages, key=lambda event: -getattr(event, attribute, 0))[:count]
    return [
        {"name": event.key, "ms": round(getattr(event, attribute, 0) / 1e3, 3), "calls": event.count}
        for event in ranked
        if getattr(event, attribute, 0) > 0
    ]


def _share(busy_us: float | None, seconds: float) -> float | None:
    return round(min(1.0, busy_us / (seconds * 1e6)), 4) if busy_us is not None and seconds else None
