"""How each job ended, as `summary.json` in the launch directory and a table on the terminal.

A job's final loss and output come from the worker's own `status.json` when it wrote one, else
from its progress lines; its status comes from its exit code (worker contract: 0 succeeded,
1 failed, 2 bad usage or input, 3 CUDA out of memory). A packed job's GPU memory reservation (as
planned; its worker was capped there) stands beside the peak its worker measured, and a job that held
more than it reserved is flagged (`over_reservation_gib`) and named under the table; null on the CPU.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recipe_runner.planning.jobs import JobSpec
from recipe_runner.results.live import Progress, fmt_duration, fmt_loss
from src.contract.env import budget_mib
from src.contract.flags import flag_name, flag_value

OOM_EXIT_CODE = 3
TAIL_LINES = 20


@dataclass
class JobResult:
    recipe: str  # key in src.recipes.RECIPES
    device: str
    gpu_uuids: list[str]
    status: str  # succeeded | failed | oom | hung | interrupted | cancelled | not started | running
    exit_code: int | None  # negative: killed by that signal
    duration_s: float | None
    final_loss: float | None
    output: str | None
    output_dir: str
    log: str
    started: str | None = None
    ended: str | None = None
    error: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    last_lines: list[str] = field(default_factory=list)  # only when it did not succeed
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # what the launcher added for this worker
    threads: int | None = None  # CPU threads of a --cpu job; None for a GPU job
    attempts: list[dict[str, Any]] = field(default_factory=list)  # earlier tries: OOM retries
    name: str = ""  # the job's name: the recipe, or recipe-<dataset>-seed<N> in a sweep
    seed: int | None = None  # the seed it ran with (None: the worker's default)
    dataset: str | None = None  # the data set it ran on (None: the worker's default)
    # GPU memory, GiB a GPU: what the job reserved as planned (less the CUDA context: what its worker's
    # allocator was capped at; None when it had its GPUs whole), what that allocator held at its peak
    # (status.json), and by how much the peak went over the reservation (None when it did not).
    reservation_gib: float | None = None
    peak_gpu_reserved_gib: float | None = None
    over_reservation_gib: float | None = None

    def __post_init__(self) -> None:
        self.name = self.name or self.recipe


def job_status(exit_code: int | None, *, started: bool, interrupted: bool) -> str:
    if not started:
        return "cancelled" if exit_code is None and interrupted else "failed"
    if exit_code == 0:
        return "succeeded"
    if interrupted:
        return "interrupted"
    return "oom" if exit_code == OOM_EXIT_CODE else "failed"


def read_summary(launch_dir: Path) -> dict[str, Any] | None:
    """A launch's summary.json, or None when there is no readable one."""
    try:
        data = json.loads((launch_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("jobs"), list) else None


def read_worker_status(output_dir: Path) -> dict[str, Any]:
    """The worker's status.json, or {} when it died before writing a readable one."""
    try:
        data = json.loads((output_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def build_result(
    spec: JobSpec,
    progress: Progress,
    exit_code: int | None,
    tail: Iterable[str],
    *,
    started: bool,
    interrupted: bool,
    planned: JobSpec | None = None,
) -> JobResult:
    """The job's result from what the launcher saw and its worker wrote; `planned`: the job as planned, whose
    reservation counts (a retry alone has none)."""
    worker = read_worker_status(spec.output_dir)
    status = job_status(exit_code, started=started, interrupted=interrupted)
    final_loss = worker.get("final_loss")
    if not isinstance(final_loss, int | float):
        final_loss = progress.final_loss if progress.final_loss is not None else progress.loss
    budget = budget_mib((planned or spec).env)
    reservation = round(budget / 1024, 2) if budget is not None else None
    peak = worker.get("peak_gpu_reserved_gib")
    peak = peak if isinstance(peak, int | float) else None
    return JobResult(
        recipe=spec.recipe,
        name=spec.key,
        seed=_int_or_none(flag_value(spec.argv, flag_name("seed"))),
        dataset=flag_value(spec.argv, flag_name("dataset")),
        device=spec.device if started else "-",
        gpu_uuids=[gpu.uuid for gpu in spec.gpus],
        status=status,
        exit_code=exit_code,
        duration_s=_duration(progress),
        final_loss=final_loss,
        output=worker.get("output") or progress.output,
        output_dir=str(spec.output_dir),
        log=str(spec.log_path),
        started=_iso(progress.started_at),
        ended=_iso(progress.ended_at),
        error=worker.get("error") or progress.error,
        stages=worker.get("stages") or progress.stages,
        last_lines=[] if status == "succeeded" else list(tail)[-TAIL_LINES:],
        argv=list(spec.argv),
        env={k: v for k, v in spec.env.items() if k != "CUDA_VISIBLE_DEVICES" or spec.threads is not None},
        threads=spec.threads,
        reservation_gib=reservation,
        peak_gpu_reserved_gib=peak,
        over_reservation_gib=over_reservation(peak, reservation),
    )


def over_reservation(peak_gib: float | None, reservation_gib: float | None) -> float | None:
    """GiB by which a measured peak went over the reservation; None when it did not, or either is unknown."""
    if peak_gib is None or reservation_gib is None:
        return None
    over = round(peak_gib - reservation_gib, 2)
    return over if over > 0 else None


def launch_exit_code(results: Sequence[JobResult], signum: int | None) -> int:
    """0 all succeeded, 1 any did not, 128+N when the launch was stopped by signal N (130: Ctrl-C)."""
    if signum is not None:
        return 128 + signum
    return 0 if results and all(r.status == "succeeded" for r in results) else 1


def write_summary(
    launch_dir: Path,
    launch_id: str,
    results: Sequence[JobResult],
    exit_code: int | None,
    command: Sequence[str],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """summary.json, atomically; `exit_code` None while the launch is still running. `extra`: more keys
    (the splits and where they came from; a search's trials)."""
    path = launch_dir / "summary.json"
    data = {
        "launch_id": launch_id,
        "launch_dir": str(launch_dir),
        "command": list(command),
        "exit_code": exit_code,
        "succeeded": sum(r.status == "succeeded" for r in results),
        "launcher_peak_rss_mib": peak_rss_mib(),
        "jobs": [asdict(r) for r in results],
        **(extra or {}),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def peak_rss_mib() -> float:
    """The launcher's own peak resident memory so far: it must stay small beside its workers.

    Linux's VmHWM starts afresh at exec; ru_maxrss (the fallback elsewhere) keeps the peak of the
    process that forked us, e.g. 834 MiB when pytest started the launcher.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def render_summary(results: Sequence[JobResult]) -> str:
    header = ("recipe", "device", "status", "exit", "duration", "final loss", "output")
    rows = [header, *(_summary_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    over = [r for r in results if r.over_reservation_gib]
    if over:
        lines.append("")
    for r in over:
        lines.append(
            f"{r.name} went {r.over_reservation_gib:.2f} GiB over its GPU memory reservation: held "
            f"{r.peak_gpu_reserved_gib:.2f} GiB at its peak, reserved {r.reservation_gib:.2f} GiB "
            "(its memory plan was low)"
        )
    for r in results:
        if r.last_lines:
            lines += ["", f"{r.name} {r.status} (exit {_exit_text(r.exit_code)}); last lines of {r.log}:"]
            lines += [f"    {text}" for text in r.last_lines]
    return "\n".join(lines)


def _summary_row(r: JobResult) -> tuple[str, ...]:
    return (
        r.name,
        r.device,
        r.status,
        _exit_text(r.exit_code),
        fmt_duration(r.duration_s),
        fmt_loss(r.final_loss),
        r.output or "-",
    )


def _exit_text(code: int | None) -> str:
    if code is None:
        return "-"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return str(code)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def _duration(progress: Progress) -> float | None:
    if progress.started is None or progress.ended is None:
        return None
    return round(progress.ended - progress.started, 3)


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(stamp))
