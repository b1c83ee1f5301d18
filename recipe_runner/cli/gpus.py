"""`recipe-run gpus`: what NVML sees (index, name, UUID, memory, processes) and which GPUs a launch may use.

recipe-run gpus [--json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict

from recipe_runner.cli.common import add_busy_flag, print_rows
from recipe_runner.host.gpus import GpuInfo, NvmlUnavailable, probe_gpus
from recipe_runner.host.leases import lease_dir, reservations

HELP = "show the GPUs NVML sees and which are free"


def add_flags(p: argparse.ArgumentParser) -> None:
    add_busy_flag(p)
    p.add_argument("--json", action="store_true", help="JSON records instead of a table")


def run(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> int:
    try:
        gpus = probe()
    except NvmlUnavailable as error:
        print(f"recipe-run: cannot list GPUs: {error}\n  no NVIDIA driver here? Recipes still run with --cpu")
        return 1
    leases = lease_dir()
    verdicts = [verdict(gpu, args.max_used_mib, reservations(leases, gpu.uuid)) for gpu in gpus]
    if args.json:
        records = [
            {**asdict(g), "free": v == "free", "verdict": v} for g, v in zip(gpus, verdicts, strict=True)
        ]
        print(json.dumps(records))
        return 0
    rows = [("index", "name", "uuid", "memory used/total", "util", "processes", "free")]
    for gpu, said in zip(gpus, verdicts, strict=True):
        util = "-" if gpu.utilization_pct is None else f"{gpu.utilization_pct}%"
        procs = ",".join(map(str, gpu.processes)) or "-"
        memory = f"{gpu.memory_used_mib}/{gpu.memory_total_mib} MiB"
        rows.append((str(gpu.index), gpu.name, gpu.uuid, memory, util, procs, said))
    print_rows(rows)
    if not gpus:
        print("(NVML sees no GPU)")
    return 0


def verdict(gpu: GpuInfo, max_used_mib: int, live: Sequence) -> str:
    """free, shared (other launchers' packed jobs), or why not."""
    holders = "; ".join(r.note for r in live)
    if any(r.exclusive for r in live):
        return f"no: leased ({holders})"
    if live:
        reserved = sum(r.mib for r in live) / 1024
        return f"shared: {len(live)} packed job(s), {reserved:.1f} GiB reserved ({holders})"
    busy = gpu.busy_reason(max_used_mib)
    return f"no: {busy}" if busy else "free"
