"""The live view: progress events -> table rows, ETA, stage labels; the TTY reporter's redraws."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from recipe_runner.host.gpus import GpuInfo
from recipe_runner.planning.jobs import JobSpec
from recipe_runner.results.live import (
    LiveReporter,
    PlainReporter,
    Progress,
    apply_event,
    eta_seconds,
    render_table,
)
from src.contract.progress import format_event, parse_line


@dataclass
class View:
    spec: JobSpec
    progress: Progress = field(default_factory=Progress)


def job(recipe: str = "r3-two-stage") -> View:
    spec = JobSpec(recipe, ("w",), {}, Path("/o"), Path("/o/l.log"), (GpuInfo(0, "GPU-0"),))
    return View(spec, Progress(state="running", started=100.0))


def feed(view: View, line: str, now: float) -> None:
    apply_event(view.progress, parse_line(line), now)


def test_steps_give_loss_and_eta_per_stage() -> None:
    view = job()
    feed(view, format_event("start", recipe="r3-two-stage", stage="stage1-vision", device="cuda:0"), 100.0)
    for step, now in ((1, 101.0), (2, 103.0), (3, 105.0)):
        feed(view, format_event("step", stage="stage1-vision", step=step, total=11, loss=1.0 / step), now)
    assert view.progress.loss == 1.0 / 3
    assert eta_seconds(view.progress, 105.0) == 2.0 * 8  # 2 s a step since the stage's first step
    feed(view, format_event("step", stage="stage2-llm", step=1, total=4, loss=0.9, gpu_mem_gib=7.25), 106.0)
    assert (view.progress.stage, view.progress.step, view.progress.total) == ("stage2-llm", 1, 4)
    assert eta_seconds(view.progress, 106.0) is None  # one step of a new stage: no rate yet


def test_table_shows_stage_step_loss_eta_and_memory() -> None:
    view = job()
    feed(
        view, format_event("step", stage="stage1-vision", step=1, total=10, loss=2.0, gpu_mem_gib=7.25), 101.0
    )
    feed(
        view, format_event("step", stage="stage1-vision", step=3, total=10, loss=1.5, gpu_mem_gib=7.25), 105.0
    )
    header, row = render_table([view], 105.0)
    assert header.split() == [
        "recipe",
        "device",
        "state",
        "stage",
        "step",
        "loss",
        "elapsed",
        "eta",
        "gpu",
        "mem",
    ]
    assert row.split() == [
        "r3-two-stage",
        "gpu0",
        "running",
        "1/2",
        "stage1-vision",
        "3/10",
        "1.5000",
        "5.0s",
        "14s+",
        "7.2",
        "GiB",
    ]  # "+": stage 2 still to come


def test_live_reporter_hides_progress_lines_and_redraws_the_table_in_place() -> None:
    out = io.StringIO()
    reporter = LiveReporter(out, interval=0.0)
    view = job("r1-llm-only")
    reporter.begin([view])
    reporter.line(view, format_event("step", stage="main", step=1, total=2, loss=1.0), {"event": "step"})
    reporter.line(view, "loading weights\r50%\r100%", None)
    reporter.tick()
    reporter.line(view, "saved", None)
    reporter.tick()
    reporter.close()
    text = out.getvalue()
    assert "RR_PROGRESS" not in text
    assert "[r1-llm-only gpu0] 100%\n" in text  # a carriage-return line shows its last state
    assert text.count("\x1b[3F\x1b[J") == 2  # moved back over the 3-line table before each redraw
    assert text.count("recipe") == 2


def test_plain_reporter_prints_progress_compactly() -> None:
    out = io.StringIO()
    reporter = PlainReporter(out)
    view = job("r1-llm-only")
    reporter.begin([view])
    line = format_event("step", stage="main", step=2, total=5, loss=0.25)
    reporter.line(view, line, parse_line(line))
    assert out.getvalue() == "[r1-llm-only gpu0] step 2/5 loss 0.2500\n"
