"""summary.json's planned-against-measured GPU memory: a packed job's reservation beside its measured peak,
flagged and named under the end-of-run table when the peak went over; nothing of it on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

from recipe_runner.planning.jobs import JobSpec, alone
from recipe_runner.results.live import Progress
from recipe_runner.results.summary import build_result, over_reservation, render_summary
from src.contract.env import BUDGET_ENV


def _spec(tmp_path: Path, env: dict[str, str], threads: int | None = None) -> JobSpec:
    out = tmp_path / "r4-joint"
    return JobSpec("r4-joint", ("worker",), env, out, tmp_path / "r4-joint.log", threads=threads)


def _result(tmp_path: Path, spec: JobSpec, status: dict, planned: JobSpec | None = None):
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    (spec.output_dir / "status.json").write_text(json.dumps(status))
    return build_result(spec, Progress(), 0, [], started=True, interrupted=False, planned=planned)


def test_over_is_the_excess_of_the_peak_only() -> None:
    assert over_reservation(41.3, 40.0) == 1.3
    assert over_reservation(39.0, 40.0) is None and over_reservation(40.0, 40.0) is None
    assert over_reservation(None, 40.0) is None and over_reservation(41.0, None) is None


def test_a_retry_alone_is_measured_against_the_reservation_it_was_planned_with(tmp_path: Path) -> None:
    planned = _spec(tmp_path, {BUDGET_ENV: str(40 * 1024)})
    result = _result(tmp_path, alone(planned), {"peak_gpu_reserved_gib": 41.3}, planned=planned)
    assert (result.reservation_gib, result.peak_gpu_reserved_gib, result.over_reservation_gib) == (
        40.0,
        41.3,
        1.3,
    )
    line = (
        "r4-joint went 1.30 GiB over its GPU memory reservation: held 41.30 GiB at its peak, reserved 40.00"
    )
    assert line in render_summary([result])


def test_a_packed_job_within_its_reservation_is_not_flagged(tmp_path: Path) -> None:
    spec = _spec(tmp_path, {BUDGET_ENV: str(40 * 1024)})
    result = _result(tmp_path, spec, {"peak_gpu_reserved_gib": 38.2, "reservation_gib": 40.0})
    assert (result.reservation_gib, result.peak_gpu_reserved_gib, result.over_reservation_gib) == (
        40.0,
        38.2,
        None,
    )
    assert "reservation" not in render_summary([result])


def test_on_the_cpu_the_fields_are_null_and_the_table_is_unchanged(tmp_path: Path) -> None:
    spec = _spec(tmp_path, {"CUDA_VISIBLE_DEVICES": ""}, threads=2)
    result = _result(tmp_path, spec, {"peak_gpu_mem_gib": None, "final_loss": 0.5})
    assert (result.reservation_gib, result.peak_gpu_reserved_gib, result.over_reservation_gib) == (
        None,
        None,
        None,
    )
    assert render_summary([result]).splitlines() == [
        "recipe    device  status     exit  duration  final loss  output",
        "r4-joint  cpu     succeeded  0     -         0.5000      -",
    ]
