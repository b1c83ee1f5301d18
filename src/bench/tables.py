"""What the benchmark writes: OUT/bench.json and OUT/bench.md, whose tables set every row against the
bare loop's row of its shape and recipe, the planner's candidates (predicted against measured), and the
end-to-end worker runs; and how a row's rounds (--rounds) make one row. Pure functions of the report
dict (src/bench/__main__.py builds it).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from src.bench.measure import mfu_pct
from src.utils.files import write_json_atomic, write_text_atomic

WITHIN = 0.05  # the chosen setting should be within 5% of the fastest candidate measured


def write_results(out: Path, report: dict) -> None:
    write_json_atomic(out / "bench.json", report)
    write_text_atomic(out / "bench.md", render_table(report) + "\n")


def combine_rounds(rounds: list[dict], env: dict) -> dict:
    """One row from its rounds (each a whole row as bench_one measured it), all kept under "rounds".

    step_s is the median of the rounds' step times; tokens/s, samples/s and MFU derive from it; the
    peak memory is the worst round's; GPU busy the median. The first round's first-step and compile
    times stand (later rounds may find the compiled graphs cached), as do its profile and settings.
    One timed round is the row as measured; a row no round could time is reported as skipped.
    """
    timed = [r for r in rounds if not r.get("skipped") and r.get("step_s")]
    if len(timed) <= 1:
        return {**(timed or rounds)[0], "rounds": rounds}
    step_s = statistics.median(r["step_s"] for r in timed)
    peaks = [r["peak_gib"] for r in timed if r.get("peak_gib") is not None]
    busy = [r["gpu_util_pct"] for r in timed if r.get("gpu_util_pct") is not None]
    return {
        **timed[0],
        "step_s": round(step_s, 4),
        "tokens_s": round(timed[0]["tokens_per_step"] / step_s, 1),
        "samples_s": round(timed[0]["samples_per_step"] / step_s, 2),
        "mfu_pct": mfu_pct(timed[0]["step_flops"], step_s, env.get("bf16_peak_tflops")),
        "peak_gib": max(peaks) if peaks else None,
        "gpu_util_pct": round(statistics.median(busy), 1) if busy else None,
        "wall_s": round(sum(r["wall_s"] for r in timed), 1),
        "rounds": rounds,
    }


def _round_step_times(row: dict) -> str | None:
    """Every round's step time, "1.293 / 1.301 / 1.288"; a round at another setting than the row's
    (the bare loop's search can land elsewhere) says which, a skipped round says so."""
    cells = []
    for found in row.get("rounds") or []:
        if found.get("skipped"):
            cells.append("skipped")
            continue
        setting = _setting(found)
        cells.append(str(found["step_s"]) + ("" if setting == _setting(row) else f" ({setting})"))
    return " / ".join(cells) or None


def _setting(row: dict) -> str:
    return f"{row['micro_batch']}x{row['grad_accum']}" + (" ckpt" if row["checkpointing"] else "")


COLUMNS = (
    ("shape", "shape"),
    ("recipe", "recipe"),
    ("variant", "variant"),
    ("micro x accum", lambda r: f"{r['micro_batch']}x{r['grad_accum']}"),
    ("ckpt", lambda r: "on" if r["checkpointing"] else "off"),
    ("compile", lambda r: "on" if r["compile"] else "off"),
    ("step s", "step_s"),  # the median over rounds
    ("step s by round", _round_step_times),
    ("tokens/s", "tokens_s"),
    ("samples/s", "samples_s"),
    ("x plain", None),  # filled against the plain row of the same shape and recipe
    ("peak GiB", "peak_gib"),
    ("planned GiB", "predicted_gib"),
    ("MFU %", "mfu_pct"),
    ("GPU busy %", "gpu_util_pct"),
    ("compile s", "compile_s"),
    ("recompiles", "recompiles"),
    ("one-size micro-batches %", "uniform_micro_batches_pct"),  # images of one size: the batched vision path
)


def render_table(report: dict) -> str:
    """The markdown tables: every row against the plain row of its shape and recipe; the planner's
    candidates, predicted against measured; the end-to-end runs."""
    env = report["environment"]
    rows = [r for r in report["rows"] if not r.get("skipped")]
    plain = {(r["shape"], r["recipe"]): r["tokens_s"] for r in rows if r["variant"] == "plain"}
    lines = [
        f"{env['device']['name']} ({env['device'].get('uuid') or 'cpu'}), bf16 peak measured "
        f"{env['bf16_peak_tflops']} TFLOP/s, {env['date']}, "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
        image_sizes_line(env, rows),
        "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    for r in rows:
        base = plain.get((r["shape"], r["recipe"]))
        speedup = f"{r['tokens_s'] / base:.2f}" if base and r["tokens_s"] else "-"
        cells = [speedup if key is None else (key(r) if callable(key) else r.get(key)) for _, key in COLUMNS]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    for r in report["rows"]:
        if r.get("skipped"):
            lines.append(f"\n{r['shape']} {r['recipe']} {r['variant']}: skipped ({r['skipped']})")
    lines += candidates_table(rows) + end_to_end_table(report.get("end_to_end") or [])
    return "\n".join(lines)


def image_sizes_line(env: dict, rows: list[dict]) -> str:
    """Which images the rows trained on: --image-sizes, and each shape's sizes with their counts."""
    sizes: dict[str, str] = {}
    for r in rows:
        found = r.get("image_sizes") or {}
        sizes.setdefault(r["shape"], ", ".join(f"{size} x {count}" for size, count in found.items()))
    each = "; ".join(f"{shape}: {listed}" for shape, listed in sizes.items() if listed)
    return f"Images: {env.get('image_sizes', 'one')}" + (f" ({each})" if each else "")


def candidates_table(rows: list[dict]) -> list[str]:
    """Predicted against measured step time of the planner's candidates, and whether its first choice
    was within WITHIN of the fastest one measured."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["variant"].startswith("cand"):
            groups.setdefault((r["shape"], r["recipe"]), []).append(r)
    if not groups:
        return []
    lines = [
        "",
        "| shape | recipe | candidate | setting | predicted step s | measured step s | tokens/s | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for (shape, recipe), found in groups.items():
        for r in found:
            setting = f"{r['micro_batch']}x{r['grad_accum']} ckpt {'on' if r['checkpointing'] else 'off'}"
            setting += " compiled" if r["compile"] else ""
            cells = [shape, recipe, r["variant"], setting, r["predicted_step_s"], r["step_s"], r["tokens_s"]]
            lines.append(
                "| " + " | ".join("-" if c is None else str(c) for c in [*cells, r["peak_gib"]]) + " |"
            )
        verdicts.append(_verdict(shape, recipe, found))
    return lines + [""] + verdicts


def _verdict(shape: str, recipe: str, found: list[dict]) -> str:
    timed = [r for r in found if r["step_s"]]
    chosen = next((r for r in timed if r["variant"] == "cand1"), None)
    if not chosen:
        return f"{shape} {recipe}: the planner's choice did not run"
    fastest = min(timed, key=lambda r: r["step_s"])
    slower = chosen["step_s"] / fastest["step_s"] - 1
    ok = "within" if slower <= WITHIN else "NOT within"
    return (
        f"{shape} {recipe}: the planner's choice (cand1) is {100 * slower:.1f}% slower than the fastest "
        f"measured ({fastest['variant']}): {ok} {100 * WITHIN:.0f}%"
    )


def end_to_end_table(runs: list[dict]) -> list[str]:
    if not runs:
        return []
    keys = ("wall_s", "import_s", "load_s", "first_step_s", "train_s", "save_s", "exit_s")
    lines = [
        "",
        "| shape | recipe | setting | steps | exit | "
        + " | ".join(k.removesuffix("_s") + " s" for k in keys)
        + " |",
        "|" + " --- |" * (5 + len(keys)),
    ]
    for r in runs:
        cells = [r["shape"], r["recipe"], r["setting"], r["steps"], r["exit_code"], *(r.get(k) for k in keys)]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return lines
