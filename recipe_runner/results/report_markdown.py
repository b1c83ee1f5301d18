"""report.md: the report of one launch (recipe_runner/results/report.py builds it) as Markdown: the table,
the verdict in one sentence, the intervals and paired differences, the breakdowns by label and box size.
"""

from __future__ import annotations

from pathlib import Path

from recipe_runner.results.report_search import search_lines
from src.scoring.winner import HEADLINE

# (key in metrics.json, column title); higher is better for all of them.
METRICS = (
    ("precision", "P@0.5"),
    ("recall", "R@0.5"),
    ("f1", "F1@0.5"),
    ("map_50", "mAP@0.5"),
    ("map_50_95", "mAP@[.5:.95]"),
    ("mean_iou", "mean IoU"),
    ("parse_rate", "parsed"),
)


RESAMPLES = 1000  # bootstrap resamples of the test images (fixed RNG seed: reports reproduce)


def lora_cell(lora: dict) -> str:
    return f"{lora['rank']} / {lora['alpha']}" if "rank" in lora and "alpha" in lora else "-"


MAX_LABEL_COLUMNS = 12  # the breakdown table shows the labels with most ground truth; report.json has all


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _metric_cell(row: dict, key: str) -> str:
    if key not in row["metrics"]:
        return "-"
    gain = row["gain"].get(key)
    return _fmt(row["metrics"][key]) + (f" ({gain:+.3f})" if gain is not None else "")


def table_head(columns: list[str]) -> list[str]:
    """A Markdown table's header row and the rule under it."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def answer_lines(report: dict) -> list[str]:
    """The answer the user came for: the winner and how sure that is, one paragraph each (report.md opens
    with them; the launch prints them when it ends)."""
    best, rows = report["best"], report["recipes"]
    if HEADLINE in best:
        winner = next(r for r in rows if r["recipe"] == best[HEADLINE])
        gain = winner["gain"].get(HEADLINE)
        over = f", {gain:+.3f} over the zero-shot base" if gain is not None else ""
        score = _fmt(winner["metrics"][HEADLINE])
        lines = [f"**Winner by F1 at IoU 0.5: `{winner['recipe']}`** ({score}{over})."]
    else:
        lines = ["No recipe produced metrics: see the status column and each recipe's train.log."]
    verdicts = report.get("verdicts", [])
    return lines + [verdict_sentence(verdict, len(verdicts) > 1) for verdict in verdicts] + unscored(rows)


def unscored(rows: list[dict]) -> list[str]:
    """A sentence for each recipe that trained but was not scored: the verdict above leaves it out."""
    return [
        f"**Not in the verdict: `{row['recipe']}`** trained, but its evaluation failed ({row['eval_error']});"
        f" `recipe-run eval {row['output_dir']}` scores it again."
        for row in rows
        if row["status"] == "succeeded" and row.get("eval_error")
    ]


def reservation_cell(row: dict) -> str:
    """A packed job's GPU memory: held at its peak / reserved (GiB), and by how much it went over."""
    held, reserved, over = (
        row.get("peak_gpu_reserved_gib"),
        row.get("reservation_gib"),
        row.get("over_reservation_gib"),
    )
    if reserved is None:
        return "-"
    cell = f"{_fmt(held, 2)} / {_fmt(reserved, 2)}"
    return cell + (f" (**{over:.2f} over**)" if over else "")


def render_markdown(report: dict, pictures: list[str]) -> str:
    best, base, rows = report["best"], report["base"], report["recipes"]
    lines = [f"# Recipe comparison: launch {report['launch_id']}"]
    for paragraph in answer_lines(report):
        lines += ["", paragraph]
    titles = [title for _, title in METRICS]
    packed = any(row.get("reservation_gib") is not None for row in rows)  # only GPU launches that packed
    head = [
        "recipe",
        "status",
        *titles,
        "trainable params",
        "LoRA r / alpha",
        "wall time",
        "GPU-hours",
        "peak GPU GiB",
        *(["GPU GiB held / reserved"] if packed else []),
        "final loss",
    ]
    lines += [
        "",
        "Metrics on the test split; in brackets, the gain over the untrained base."
        + (
            " Held / reserved: a packed job's peak GPU memory (what its allocator held) against its "
            "reservation less the CUDA context, where its worker was capped while packed."
            if packed
            else ""
        ),
        "",
        *table_head(head),
    ]
    if base:
        lines.append(
            "| base (zero-shot) | - | "
            + " | ".join(_fmt(base.get(k)) for k, _ in METRICS)
            + " | 0 | - | - | - | - |"
            + (" - |" if packed else "")
            + " - |"
        )
    for row in rows:
        cells = [
            f"`{row['recipe']}`",
            row["status"],
            *(_metric_cell(row, k) for k, _ in METRICS),
            _fmt(row["trainable_params"]),
            lora_cell(row.get("lora") or {}),
            _fmt(row["wall_s"], 1) + (" s" if row["wall_s"] else ""),
            _fmt(row["gpu_hours"], 4),
            _fmt(row["peak_gpu_mem_gib"], 2),
            *([reservation_cell(row)] if packed else []),
            _fmt(row["final_loss"], 4),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _source_lines(report)
    lines += _intervals_table(report)
    lines += _differences_table(report)
    lines += _over_seeds_table(report["over_seeds"])
    lines += _breakdown_tables(report)
    if report.get("search"):
        lines += search_lines(report["search"], report.get("splits"))
    lines += [
        "",
        "Best per metric: " + ", ".join(f"{title} `{best[k]}`" for k, title in METRICS if k in best)
        if best
        else "",
        "",
    ]
    for row in rows:
        if row["status"] != "succeeded":
            lines.append(f"- `{row['recipe']}` {row['status']}: {row['error'] or 'see its log'}")
    lines += ["", *(f"![{Path(p).stem}]({p})" for p in pictures), ""]
    return "\n".join(lines)


def _source_lines(report: dict) -> list[str]:
    """Where the numbers come from: the test split, its size and how it was made (the search's section
    lists every split)."""
    test = (report.get("splits") or {}).get("test")
    if not test or report.get("search"):
        return []
    return ["", f"Scored on the test split: {test['images']} images, {test['how']}."]


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _band(item: dict | None, signed: bool = False) -> str:
    """'0.952 [0.913, 0.984]' for {value, low, high}; '+0.046 [+0.012, +0.081]' for a difference."""
    if not item:
        return "-"
    show = _signed if signed else (lambda v: f"{v:.3f}")
    value = item["difference"] if "difference" in item else item["value"]
    return f"{show(value)} [{show(item['low'])}, {show(item['high'])}]"


def verdict_sentence(verdict: dict, name_dataset: bool) -> str:
    """One sentence: is the winner clear? From the paired F1 difference to the runner-up (else the base)."""
    where = f"On `{verdict['dataset']}`: " if name_dataset and verdict["dataset"] else ""
    who = f"`{verdict['winner']}`" + (" (mean over seeds)" if verdict["over_seeds"] else "")
    if not verdict["comparisons"]:
        return f"{where}{who} is the only recipe with predictions; nothing to compare it with."
    parts = []
    for comparison in verdict["comparisons"]:
        d = comparison["difference"].get(HEADLINE)
        if not d:
            continue
        other = "the zero-shot base" if comparison["against"] == "base" else f"`{comparison['name']}`"
        interval = f"95% CI [{_signed(d['low'])}, {_signed(d['high'])}]"
        if d["significant"]:
            verb = "beats" if d["difference"] > 0 else "trails"
            parts.append(f"{verb} {other} by {_signed(d['difference'])} F1 ({interval})")
        else:
            change = _signed(d["difference"])
            parts.append(f"shows no significant difference from {other} ({change} F1, {interval} includes 0)")
    images = verdict["comparisons"][0]["difference"].get(HEADLINE, {}).get("images")
    head = "**The winner is clear:**" if verdict["clear"] else "**The winner is not clear:**"
    tail = f"; paired bootstrap over {images} test images, {verdict['resamples']} resamples."
    return f"{where}{head} {who} " + " and ".join(parts) + tail


def _intervals_table(report: dict) -> list[str]:
    rows = [r for r in report["recipes"] if r.get("intervals")]
    if not rows:
        return []
    titles = [title for _, title in METRICS]
    lines = [
        "",
        f"95% intervals by bootstrap over the test images ({RESAMPLES} resamples; value [low, high]):",
        "",
        *table_head(["recipe", "images", *titles]),
    ]
    for dataset, intervals in report.get("base_intervals", {}).items():
        name = "base (zero-shot)" + (f" {dataset}" if len(report["base_intervals"]) > 1 else "")
        cells = " | ".join(_band(intervals.get(k)) for k, _ in METRICS)
        lines.append(f"| {name} | {intervals.get('images', '-')} | {cells} |")
    for row in rows:
        images = row.get("images") or "-"
        cells = " | ".join(_band(row["intervals"].get(k)) for k, _ in METRICS)
        lines.append(f"| `{row['recipe']}` | {images} | {cells} |")
    return lines


def _differences_table(report: dict) -> list[str]:
    verdicts = [v for v in report.get("verdicts", []) if v["comparisons"]]
    if not verdicts:
        return []
    titles = [title for _, title in METRICS]
    lines = [
        "",
        "The winner minus the others, on the same resampled images (* : the 95% interval excludes 0):",
        "",
        *table_head(["comparison", *titles]),
    ]
    for verdict in verdicts:
        for comparison in verdict["comparisons"]:
            name = "base" if comparison["against"] == "base" else f"`{comparison['name']}`"
            cells = []
            for key, _ in METRICS:
                d = comparison["difference"].get(key)
                cells.append(_band(d, signed=True) + (" *" if d and d["significant"] else ""))
            lines.append(f"| `{verdict['winner']}` − {name} | " + " | ".join(cells) + " |")
    return lines


def _over_seeds_table(groups: list[dict]) -> list[str]:
    if not groups:
        return []
    titles = [title for _, title in METRICS]
    lines = [
        "",
        "Over seeds: mean ± standard deviation of the seeds that succeeded, then in brackets the 95%",
        "interval of that mean by bootstrap over the test images (seed spread and image sampling, apart):",
        "",
        *table_head(["recipe", "data set", "seeds", *titles]),
    ]
    for group in groups:
        cells = []
        for k, _ in METRICS:
            if k not in group["metrics"]:
                cells.append("-")
                continue
            band = (group.get("intervals") or {}).get(k)
            images = f" [{band['low']:.3f}, {band['high']:.3f}]" if band else ""
            cells.append(f"{group['metrics'][k]['mean']:.3f} ± {group['metrics'][k]['std']:.3f}{images}")
        seeds = f"{group['succeeded']}/{len(group['seeds'])} ({','.join(map(str, group['seeds']))})"
        lines.append(
            f"| `{group['recipe']}` | {group['dataset'] or '-'} | {seeds} | " + " | ".join(cells) + " |"
        )
    return lines


def _breakdown_rows(report: dict) -> list[tuple[str, dict, dict]]:
    """(name, per_label, per_size) of the base(s) and every recipe with predictions."""
    out = []
    for dataset, found in report.get("base_breakdown", {}).items():
        name = "base (zero-shot)" + (f" {dataset}" if len(report["base_breakdown"]) > 1 else "")
        out.append((name, found["per_label"], found["per_size"]))
    out += [
        (f"`{r['recipe']}`", r["per_label"], r["per_size"]) for r in report["recipes"] if r.get("per_size")
    ]
    return out


def _breakdown_tables(report: dict) -> list[str]:
    """F1@0.5 by label and by COCO box size, one row per model: where each recipe wins."""
    rows = _breakdown_rows(report)
    if not rows:
        return []
    support: dict[str, int] = {}
    for _, per_label, _ in rows:
        for label, item in per_label.items():
            support[label] = max(support.get(label, 0), item["support"])
    # Labels with no true box in the test split (only mistaken predictions) have no F1 worth a column.
    labels = sorted((lb for lb in support if support[lb]), key=lambda lb: (-support[lb], lb))[
        :MAX_LABEL_COLUMNS
    ]
    sizes = ("small", "medium", "large")
    size_support = {s: max(r[2].get(s, {}).get("support", 0) for r in rows) for s in sizes}

    def cell(item: dict | None) -> str:
        return f"{item['f1']:.3f}" if item and (item["support"] or item.get("predicted")) else "-"

    more = (
        f" (the {MAX_LABEL_COLUMNS} with most boxes; report.json has all)"
        if len(support) > len(labels)
        else ""
    )
    lines = [
        "",
        f"F1@0.5 by label{more}, and by box size as COCO counts it (area in pixels of the original image:",
        "small < 32², medium < 96², large above); n is the number of ground-truth boxes:",
        "",
        *table_head(
            [
                "model",
                *(f"{label} (n={support[label]})" for label in labels),
                *(f"{s} (n={size_support[s]})" for s in sizes),
            ]
        ),
    ]
    for name, per_label, per_size in rows:
        cells = [cell(per_label.get(label)) for label in labels] + [cell(per_size.get(s)) for s in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
