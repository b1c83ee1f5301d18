"""The live table while a worker evaluates: images done / total in the step column, and an ETA."""

from pathlib import Path

from recipe_runner.host.gpus import GpuInfo
from recipe_runner.planning.jobs import JobSpec
from recipe_runner.results.live import Progress, apply_event, describe_event, eta_seconds, render_table
from src.contract.progress import format_event, parse_line


class View:
    def __init__(self) -> None:
        self.spec = JobSpec("r4-joint", ("w",), {}, Path("/o"), Path("/o/l.log"), (GpuInfo(0, "GPU-0"),))
        self.progress = Progress(state="running", started=100.0)


def feed(view: View, event: str, now: float, **fields) -> None:
    apply_event(view.progress, parse_line(format_event(event, **fields)), now)


def test_eval_events_show_images_done_and_an_eta_after_training_steps():
    view = View()
    feed(view, "step", 100.0, stage="r4-joint", step=10, total=10, loss=0.5)
    feed(view, "stage_start", 110.0, stage="eval", model="/o/adapter")
    assert (view.progress.stage, view.progress.step) == ("eval", None)  # the training count is gone
    feed(view, "eval", 110.0, stage="eval", done=0, total=200)
    feed(view, "eval", 120.0, stage="eval", done=50, total=200, images_per_s=5.0)
    assert eta_seconds(view.progress, 120.0) == 30.0  # 50 images in 10 s, 150 to go
    row = render_table([view], 120.0)[1].split()
    assert row[3:5] == ["eval", "50/200"] and row[5] == "img" and "30s" in row
    assert view.progress.loss == 0.5  # the last training loss stays on show


def test_baseline_eval_starts_its_own_count_and_prints_compactly():
    view = View()
    feed(view, "eval", 100.0, stage="eval", done=200, total=200)
    feed(view, "eval", 101.0, stage="baseline", done=0, total=200)
    assert (view.progress.stage, view.progress.step, view.progress.rate_base) == ("baseline", 0, (101.0, 0))
    line = describe_event({"event": "eval", "stage": "baseline", "done": 8, "total": 32, "images_per_s": 2.5})
    assert line == "baseline: 8/32 test images, 2.50 images/s"


def test_a_trials_scoring_names_the_validation_split():
    line = describe_event({"event": "eval", "stage": "eval", "split": "validation", "done": 2, "total": 6})
    assert line == "eval: 2/6 validation images"
