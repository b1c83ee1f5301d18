"""What the user sees while recipes run: prefixed log lines, and on a terminal a live table.

Each child's lines are printed whole, prefixed with recipe and device (`[r1-llm-only gpu0] ...`).
The table (recipe, device, state, stage, step/total, loss, elapsed, ETA, GPU memory) is built
only from the worker's `RR_PROGRESS` lines (src/contract/progress.py), never from free text. While a
worker evaluates (stage "eval", or "baseline" for the zero-shot model), the step column counts test
images done / total ("48/200 img") and the ETA follows their rate.
On a terminal those lines update the table and are not echoed; otherwise (CI, nohup, a pipe)
there is no table and they are printed compactly, one per event.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from recipe_runner.planning.jobs import JobSpec
from src.recipes import RECIPES


@dataclass
class Progress:
    """A job's state as far as its progress lines and exit tell."""

    state: str = "queued"  # queued, running, then succeeded | failed | oom | interrupted | cancelled
    pid: int | None = None
    started: float | None = None  # time.monotonic()
    ended: float | None = None
    started_at: float | None = None  # time.time(), for people
    ended_at: float | None = None
    stage: str | None = None
    step: int | None = None
    total: int | None = None
    unit: str = ""  # what step/total count: "" optimizer steps, " img" test images (eval events)
    loss: float | None = None
    gpu_mem_gib: float | None = None
    final_loss: float | None = None
    output: str | None = None
    error: str | None = None
    device_name: str | None = None
    # (time, step) of the first step event seen in the current stage: the ETA's base.
    rate_base: tuple[float, int] | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)  # stage_end events

    def elapsed(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.ended or now) - self.started


class JobView(Protocol):
    spec: JobSpec
    progress: Progress


def apply_event(progress: Progress, event: dict[str, Any], now: float) -> None:
    """Fold one RR_PROGRESS event into the job's progress."""
    kind = event.get("event")
    if event.get("stage") and event["stage"] != progress.stage:
        progress.stage, progress.step, progress.total, progress.rate_base = event["stage"], None, None, None
        progress.unit = ""
    if kind == "start":
        progress.device_name = event.get("device_name") or event.get("device")
    elif kind == "step":
        progress.step, progress.total = event.get("step"), event.get("total")
        progress.loss = _number(event.get("loss"), progress.loss)
        progress.gpu_mem_gib = _number(event.get("gpu_mem_gib"), progress.gpu_mem_gib)
        if progress.rate_base is None and isinstance(progress.step, int):
            progress.rate_base = (now, progress.step)
    elif kind == "eval":  # images done / total while evaluating: the same columns and ETA as steps
        progress.step, progress.total, progress.unit = event.get("done"), event.get("total"), " img"
        if progress.rate_base is None and isinstance(progress.step, int):
            progress.rate_base = (now, progress.step)
    elif kind == "stage_end":
        progress.stages.append(event)
        progress.final_loss = _number(event.get("final_loss"), progress.final_loss)
        progress.output = event.get("output") or progress.output
    elif kind == "end":
        progress.final_loss = _number(event.get("final_loss"), progress.final_loss)
        progress.error = event.get("error") or progress.error


def eta_seconds(progress: Progress, now: float) -> float | None:
    """Time left in the current stage, from the step rate since the stage's first step."""
    if progress.rate_base is None or not isinstance(progress.total, int) or progress.total <= 0:
        return None
    base_time, base_step = progress.rate_base
    done = (progress.step or 0) - base_step
    if done <= 0:
        return None
    return (now - base_time) / done * max(0, progress.total - (progress.step or 0))


def stage_label(recipe: str, stage: str | None) -> str:
    """'1/2 stage1-vision' for a chain's stage, the bare name otherwise."""
    names = [s.name for s in RECIPES[recipe].stages] if recipe in RECIPES else []
    if stage in names:
        return f"{names.index(stage) + 1}/{len(names)} {stage}"
    return stage or "-"


def describe_event(event: dict[str, Any]) -> str:
    """One compact line for a progress event, for plain output."""
    kind, stage = event.get("event"), event.get("stage")
    where = f" ({stage})" if stage and stage != "main" else ""
    if kind == "step":
        return f"step {event.get('step')}/{event.get('total')} loss {fmt_loss(event.get('loss'))}{where}"
    if kind == "eval":
        rate = event.get("images_per_s")
        speed = f", {rate:.2f} images/s" if isinstance(rate, int | float) else ""
        split = event.get("split", "test")
        return f"{stage or 'eval'}: {event.get('done')}/{event.get('total')} {split} images{speed}"
    if kind == "start":
        return f"started{where} on {event.get('device')} {event.get('device_name') or ''}".rstrip()
    if kind == "stage_start":
        return f"stage {stage} starts from {event.get('model')}"
    if kind == "stage_end":
        return f"stage {stage} done: loss {fmt_loss(event.get('final_loss'))}, output {event.get('output')}"
    if kind == "end":
        error = f" ({event['error']})" if event.get("error") else ""
        return f"end: {event.get('status')}, loss {fmt_loss(event.get('final_loss'))}{error}"
    return f"{kind}: {event}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def fmt_loss(loss: Any) -> str:
    return f"{loss:.4f}" if isinstance(loss, int | float) else "-"


def clean_line(text: str) -> str:
    """The visible part of a line that redraws itself with carriage returns (progress bars)."""
    parts = [part for part in text.split("\r") if part.strip()]
    return parts[-1] if parts else ""


def render_table(jobs: list[JobView], now: float) -> list[str]:
    header = ("recipe", "device", "state", "stage", "step", "loss", "elapsed", "eta", "gpu mem")
    rows = [header, *(_row(job, now) for job in jobs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _row(job: JobView, now: float) -> tuple[str, ...]:
    p = job.progress
    step = f"{p.step}/{p.total}{p.unit}" if p.step is not None else "-"
    eta = eta_seconds(p, now) if p.state == "running" else None
    more = "+" if eta is not None and _stages_left(job.spec.recipe, p.stage) else ""
    mem = f"{p.gpu_mem_gib:.1f} GiB" if p.gpu_mem_gib is not None else "-"
    return (
        job.spec.key,
        job.spec.device if job.spec.gpus or job.spec.threads is not None else "-",
        p.state,
        stage_label(job.spec.recipe, p.stage),
        step,
        fmt_loss(p.loss),
        fmt_duration(p.elapsed(now)),
        fmt_duration(eta) + more,
        mem,
    )


def _stages_left(recipe: str, stage: str | None) -> bool:
    names = [s.name for s in RECIPES[recipe].stages] if recipe in RECIPES else []
    return stage in names and names.index(stage) < len(names) - 1


def _number(value: Any, fallback: float | None) -> float | None:
    return float(value) if isinstance(value, int | float) else fallback


class PlainReporter:
    """Prints every line at once, progress events compactly; for pipes, files and CI logs."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.jobs: list[JobView] = []
        self._width = 0
        self._broken = False

    def begin(self, jobs: Sequence[JobView]) -> None:
        self.jobs = list(jobs)
        # Pad prefixes to one width so that the jobs' lines line up.
        self._width = max((len(job.spec.key) for job in jobs), default=0) + len(" gpu0") + 2

    def prefix(self, job: JobView) -> str:
        return f"[{job.spec.key} {job.spec.device}]".ljust(self._width)

    def line(self, job: JobView, text: str, event: dict[str, Any] | None) -> None:
        self._emit(f"{self.prefix(job)} {describe_event(event) if event else clean_line(text)}")

    def note(self, text: str) -> None:
        self._emit(text)

    def tick(self) -> None:
        """Called by the executor's loop a few times a second."""

    def close(self) -> None:
        self.tick()

    def _emit(self, text: str) -> None:
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        # A closed terminal or `| head` must not stop training: logs and summary.json go on.
        if self._broken:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except OSError:
            self._broken = True


class LiveReporter(PlainReporter):
    """On a terminal: log lines scroll above a status table redrawn in place."""

    def __init__(self, out: TextIO, interval: float = 0.5) -> None:
        super().__init__(out)
        self.interval = interval
        self._pending: list[str] = []
        self._drawn = 0  # lines of table on screen, to move back over
        self._last_draw = 0.0

    def line(self, job: JobView, text: str, event: dict[str, Any] | None) -> None:
        if event is None:  # progress lines feed the table instead
            self._pending.append(f"{self.prefix(job)} {clean_line(text)}")

    def _emit(self, text: str) -> None:
        self._pending.append(text)

    def tick(self, final: bool = False) -> None:
        now = time.monotonic()
        if not self._pending and now - self._last_draw < self.interval and not final:
            return
        width = max(20, shutil.get_terminal_size().columns - 1)
        table = [] if final else [row[:width] for row in ["", *render_table(self.jobs, now)]]
        erase = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        body = "".join(f"{text}\n" for text in self._pending)
        self._write(erase + body + "".join(f"{row}\n" for row in table))
        self._pending.clear()
        self._drawn, self._last_draw = len(table), now

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.tick(final=True)  # the summary table replaces the live one
