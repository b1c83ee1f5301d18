"""Planned against measured: today's memory planner and step-time model beside every GPU row of
docs/benchmarks.md (torch-free; runs on any machine in a second).

    python scripts/planned_vs_measured.py [--rows docs/measured_rows.json] [--markdown]
        [--step-sample largest|mean]

Each row of docs/measured_rows.json is one measurement taken on a GPU and written in docs/benchmarks.md
(the section it cites): a shape (2b, 7b, qwen3-vl-8b), a card, a recipe (and the stage of r3's chain, or
none for the chain's peak: the higher of its stages), the setting it ran (micro-batch x accumulation,
compiled or eager, recompute on/off, a 4-bit stage's weights dequantized once or not, activations
offloaded or not, images of one size) and what the GPU measured then: the peak GiB (`peak_kind`: the
bench's and the worker's peaks are torch.cuda.max_memory_allocated) and/or the step seconds. Optional
keys: `loop` ("core", or "bare" for the bare PyTorch loop, which the planner does not model: shown, not
counted), `variant` (the bench row or command), `frozen_vision_no_grad` (false for runs from before
frozen towers ran under no_grad), `date`, `note`, and `caveat` (the text says the measured step was
distorted, e.g. by the bench's data loader restarting every other step).

For each row this prints what the repository's planner gives today for that setting, the way the benchmark
computes its columns (src/bench/rows.py `_predicted_and_flops`, src/bench/__main__.py `planned_settings`):
  * planned peak: `_predicted_and_flops`, i.e. src.planning.memory.estimate_stage_memory(shape, stage,
    micro_batch, patches, text, recompute, compiled=, offloaded=, dequantized=) with the patches and text
    tokens of the bench's mean sample (a chain's row without a stage: estimate_recipe_memory, its largest
    stage);
  * planned step: the bench's `predicted_step_s` (planned_settings -> rank_settings), i.e.
    src.planning.step_time.predict_step_seconds for the row's setting, with the bench's largest sample
    (`Target.largest`: what the worker plans for); `--step-sample mean` uses the mean sample instead.
    Offloaded rows count OFFLOAD_STEP_FACTOR, as the planner does when offloading is asked.
Then a summary: the core rows within 5% of the measured peak and within 15% of the measured step (the goals
of issue "Packing you can trust"), and the worst rows. Exit status 0.

The samples: the bench's synthetic 644x476 images (src/bench/targets.py IMAGE_SIZE), resized as the
planner resizes them (src/planning/pixels.py image_grid): 1564 patches (391 image tokens) at patch 14, 1200
(300) at Qwen3-VL's patch 16. Their text tokens cannot be had without a processor, so they are constants
here (TOKENS_A_SAMPLE, LARGEST_TEXT_TOKENS, below), derived on the CPU with the bench's own functions:

    from src.bench.targets import _synthetic_data, sample_stats     # the bench's data and its mean sample
    from src.training.memory import largest_sample                  # what the planner is given
    from src.fixtures.shapes import shape_parts                     # the shapes' offline processors
    from src.data.dataset import build_dataset
    processor = shape_parts("7b")[2]
    dataset, _ = build_dataset(str(_synthetic_data(work, 256)), "train", "qwen2_vl", processor)
    sample_stats(dataset, processor)["tokens"], largest_sample(dataset, processor)

(tests/unit/src/planning/test_planned_vs_measured.py derives them again that way.) docs/benchmarks.md
agrees: 2026-11-26 bench, 7B r1 plain: 2373.6 tokens/s x 0.7877 s / 4 samples = 467.4 tokens a sample;
eighth session, 7B r1: 13,132 tokens/s x 0.5695 s / 16 = 467.4 (391 image tokens + 76.4 text); its "88 text
tokens a sample" is the largest sample's; the tenth session's Qwen3-VL-8B samples: "~100 text tokens".
A row on mixed image sizes carries its own sample (`planned_patches`, `text_tokens`): the bench plans such a
row at the data set's largest image, as the worker does, with its timed samples' mean text.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src.bench.targets import IMAGE_SIZE  # noqa: E402  (torch-free: the bench's image size)
from src.planning.memory import estimate_recipe_memory, estimate_stage_memory  # noqa: E402
from src.planning.pixels import image_grid  # noqa: E402
from src.planning.shapes import PUBLISHED_NAMES, published_shape  # noqa: E402
from src.planning.step_time import predict_step_seconds  # noqa: E402
from src.recipes import resolve_recipe  # noqa: E402

DEFAULT_ROWS = REPO / "docs" / "measured_rows.json"
MEMORY_GOAL_PCT, STEP_GOAL_PCT = 5.0, 15.0  # the goals: peak within 5%, step within 15%
WORST = 5  # rows named in the summary's worst lists

# Mean tokens a sample (image tokens included) of the bench's synthetic data, as sample_stats counts them
# (the attention mask of the first 16 samples, collated): what the bench's planned peak is computed from.
TOKENS_A_SAMPLE = {"2b": 467.4375, "7b": 467.4375, "qwen3-vl-8b": 400.375}
# Text tokens of the largest of the first 64 samples (src.training.memory.largest_sample): what the bench
# gives rank_settings, so what its predicted step is computed from.
LARGEST_TEXT_TOKENS = {"2b": 88, "7b": 88, "qwen3-vl-8b": 122}

RECIPE_KEYS = ("r1", "r2", "r3", "r4")
CARDS = ("H100 80GB HBM3", "H200")
PEAK_KINDS = ("allocated", "reserved", "unknown")
IMAGE_SIZES = ("one", "mixed")
LOOPS = ("core", "bare")
REQUIRED = {
    "source": str,
    "card": str,
    "shape": str,
    "recipe": str,
    "stage": (str, type(None)),
    "micro_batch": int,
    "grad_accum": int,
    "compiled": bool,
    "recompute": bool,
    "dequantized": bool,
    "offloaded": bool,
    "image_sizes": str,
    "measured_peak_gib": (float, type(None)),
    "peak_kind": str,
    "measured_step_s": (float, type(None)),
}
OPTIONAL = {
    "loop": str,
    "variant": str,
    "frozen_vision_no_grad": bool,
    "date": (str, type(None)),
    "note": str,
    "caveat": str,
    # a row not on the bench's one-size sample (mixed sizes): planned, as the bench planned it, at these
    # patches a sample (the data set's largest image) and text tokens a sample (its timed samples' mean)
    "planned_patches": int,
    "text_tokens": int,
}


def stage_names(recipe_key: str) -> tuple[str, ...]:
    """The stage names of a chain recipe (r3: stage1-vision, stage2-llm); () for a one-stage recipe."""
    return tuple(stage.name for stage in resolve_recipe(recipe_key).stages)


def _is_type(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:  # a bool is an int to isinstance; not here
        return False
    return isinstance(value, kinds)


def row_problems(row: dict) -> list[str]:
    """What is wrong with one row of the rows file (nothing: an empty list)."""
    problems = [f"missing {key}" for key in REQUIRED if key not in row]
    problems += [f"unknown key {key}" for key in row if key not in REQUIRED and key not in OPTIONAL]
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        if key in row and not _is_type(row[key], kind):
            problems.append(f"{key}: {row[key]!r} is not {kind}")
    if problems:
        return problems
    allowed = (
        ("shape", PUBLISHED_NAMES),
        ("recipe", RECIPE_KEYS),
        ("card", CARDS),
        ("peak_kind", PEAK_KINDS),
        ("image_sizes", IMAGE_SIZES),
        ("loop", LOOPS),
    )
    for key, values in allowed:
        if key in row and row[key] not in values:
            problems.append(f"{key}: {row[key]!r} not in {values}")
    if problems:
        return problems
    if row["stage"] is not None and row["stage"] not in stage_names(row["recipe"]):
        problems.append(f"stage: {row['stage']!r} is not a stage of {row['recipe']}")
    if row["micro_batch"] < 1 or row["grad_accum"] < 1:
        problems.append("micro_batch and grad_accum must be at least 1")
    if row["measured_peak_gib"] is None and row["measured_step_s"] is None:
        problems.append("neither a measured peak nor a measured step")
    if (row["image_sizes"] == "mixed") != ("planned_patches" in row and "text_tokens" in row):
        problems.append("planned_patches and text_tokens: given for a row of mixed sizes, and only for one")
    if row["offloaded"] and not row["recompute"]:
        problems.append("offloaded without recompute (the worker offloads only with recompute)")
    if row["dequantized"] and not any(s.quantized for s in _stages(row)):
        problems.append("dequantized, but the stage has no 4-bit weights")
    if not row["source"].startswith("docs/benchmarks.md, "):
        problems.append("source: must cite 'docs/benchmarks.md, <section heading>'")
    return problems


def _stages(row: dict) -> tuple:
    recipe = resolve_recipe(row["recipe"])
    if row.get("stage"):
        return tuple(s for s in recipe.stages if s.name == row["stage"])
    return recipe.stages or (recipe,)


def load_rows(path: Path) -> list[dict]:
    rows = json.loads(Path(path).read_text())
    bad = {i: problems for i, row in enumerate(rows) if (problems := row_problems(row))}
    if bad:
        raise ValueError(f"{path}: bad rows {bad}")
    return rows


@dataclass(frozen=True)
class Sample:
    """One sample as the bench plans it: image patches, and text tokens for the peak and for the step."""

    patches: int
    memory_text: int
    step_text: int


def bench_sample(shape_name: str, step_sample: str = "largest") -> Sample:
    """The bench's 644x476 sample of a shape: patches by the planner's resize, text as the bench derives
    it (`_predicted_and_flops`: round(mean tokens - patches // 4); the step: the largest sample's or the
    mean)."""
    shape, limits = published_shape(shape_name)
    patches, _ = image_grid(*IMAGE_SIZE, *limits, shape.patch_size, shape.merge_size)
    mean_text = round(TOKENS_A_SAMPLE[shape_name] - patches // 4)
    step_text = LARGEST_TEXT_TOKENS[shape_name] if step_sample == "largest" else mean_text
    return Sample(patches, mean_text, step_text)


def target(row: dict):
    """(the stage or recipe to plan, whether it is a whole chain) of a row."""
    recipe = resolve_recipe(row["recipe"])
    if row["stage"]:
        return next(s for s in recipe.stages if s.name == row["stage"]), False
    return recipe, bool(recipe.stages)


def planned_gib(row: dict, sample: Sample | None = None) -> float:
    """Today's planned peak GiB of a row's setting, as the bench computes its planned column."""
    shape, _ = published_shape(row["shape"])
    sample = sample or row_sample(row) or bench_sample(row["shape"])
    stage, chain = target(row)
    estimate = estimate_recipe_memory if chain else estimate_stage_memory
    return estimate(
        shape,
        stage,
        row["micro_batch"],
        sample.patches,
        sample.memory_text,
        row["recompute"],
        compiled=row["compiled"],
        offloaded=row["offloaded"],
        dequantized=row["dequantized"],
        frozen_vision_no_grad=row.get("frozen_vision_no_grad", True),
    ).gib


def planned_step_s(row: dict, sample: Sample | None = None) -> float:
    """Today's predicted seconds of one optimizer step at a row's setting (a chain: its stages' mean)."""
    shape, _ = published_shape(row["shape"])
    sample = sample or row_sample(row) or bench_sample(row["shape"])
    stage, _ = target(row)
    return predict_step_seconds(
        shape,
        stage,
        row["micro_batch"],
        row["grad_accum"],
        sample.patches,
        sample.step_text,
        row["recompute"],
        row["compiled"],
        row["offloaded"],
        row["dequantized"],
    )


def error_pct(planned: float, measured: float | None) -> float | None:
    return None if measured is None else 100.0 * (planned - measured) / measured


def setting_label(row: dict) -> str:
    """E.g. '8x2 compiled, dequantized' or '4x1 eager, recompute, offloaded, bare loop'."""
    parts = [f"{row['micro_batch']}x{row['grad_accum']} {'compiled' if row['compiled'] else 'eager'}"]
    parts += [word for key, word in (("recompute", "recompute"), ("dequantized", "dequantized")) if row[key]]
    if row["offloaded"]:
        parts.append("offloaded")
    if row["image_sizes"] == "mixed":
        parts.append("mixed sizes")
    if row.get("frozen_vision_no_grad") is False:
        parts.append("tower in autograd")
    if row.get("loop") == "bare":
        parts.append("bare loop")
    return ", ".join(parts)


def short_source(row: dict) -> str:
    """The cited section, short: its date and session (or its heading), the subsection, the variant."""
    headings = [h.split(" (`")[0] for h in row["source"].removeprefix("docs/benchmarks.md, ").split(" > ")]
    first = headings[0].split(":")[0]
    if not first[:4].isdigit() and row.get("date"):
        first = f"{row['date']}, {first}"
    short = " > ".join([first, *headings[1:]])
    return short + (f"; {row['variant']}" if row.get("variant") else "")


@dataclass
class Result:
    row: dict
    planned_gib: float
    planned_s: float

    @property
    def gib_error(self) -> float | None:
        return error_pct(self.planned_gib, self.row["measured_peak_gib"])

    @property
    def step_error(self) -> float | None:
        return error_pct(self.planned_s, self.row["measured_step_s"])

    @property
    def counted(self) -> bool:
        return self.row.get("loop", "core") == "core"

    def stage_label(self) -> str:
        return self.row["recipe"] + (f" {self.row['stage']}" if self.row["stage"] else "")

    def describe(self, error: float | None) -> str:
        return (
            f"{self.row['shape']} {self.stage_label()} {setting_label(self.row)} ({self.row['card']}, "
            f"{short_source(self.row)}): {error:+.1f}%"
        )


def compute(rows: list[dict], step_sample: str = "largest") -> list[Result]:
    samples = {name: bench_sample(name, step_sample) for name in {row["shape"] for row in rows}}
    results = []
    for row in rows:
        sample = row_sample(row) or samples[row["shape"]]
        results.append(Result(row, planned_gib(row, sample), planned_step_s(row, sample)))
    return results


def row_sample(row: dict) -> Sample | None:
    """The sample a mixed-size row was planned at (its own keys); None for the bench's one-size sample."""
    if "planned_patches" not in row:
        return None
    return Sample(row["planned_patches"], row["text_tokens"], row["text_tokens"])


HEADER = (
    "shape",
    "card",
    "recipe / stage",
    "setting",
    "planned GiB",
    "measured GiB",
    "error",
    "planned s",
    "measured s",
    "error",
    "source",
)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def cells(result: Result) -> list[str]:
    row = result.row
    return [
        row["shape"],
        row["card"],
        result.stage_label(),
        setting_label(row),
        _num(result.planned_gib, 2),
        _num(row["measured_peak_gib"], 2),
        _pct(result.gib_error),
        _num(result.planned_s, 3),
        _num(row["measured_step_s"], 4),
        _pct(result.step_error),
        short_source(row),
    ]


def render_markdown(results: list[Result]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in results]
    return "\n".join(lines)


def render_text(results: list[Result]) -> str:
    table = [list(HEADER), *(cells(r) for r in results)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table
    )


def _within(results: list[Result], error, goal: float) -> tuple[int, int]:
    errors = [error(r) for r in results if error(r) is not None]
    return sum(abs(e) <= goal for e in errors), len(errors)


def summary(results: list[Result]) -> str:
    core = [r for r in results if r.counted]
    clean = [r for r in core if not r.row.get("caveat")]

    def counts(rows: list[Result]) -> str:
        mem_ok, mem_n = _within(rows, lambda r: r.gib_error, MEMORY_GOAL_PCT)
        step_ok, step_n = _within(rows, lambda r: r.step_error, STEP_GOAL_PCT)
        return (
            f"peak within {MEMORY_GOAL_PCT:g}%: {mem_ok} of {mem_n}; "
            f"step within {STEP_GOAL_PCT:g}%: {step_ok} of {step_n}"
        )

    lines = [
        f"Core rows ({len(core)}): {counts(core)}.",
        f"Core rows without a caveat on the measured step ({len(clean)}): {counts(clean)}.",
        f"Bare-loop rows ({len(results) - len(core)}): shown, not counted (the planner models the core).",
    ]
    lines.append("By date measured (core rows):")
    for date in sorted({r.row.get("date") or "undated" for r in core}, reverse=True):
        rows = [r for r in core if (r.row.get("date") or "undated") == date]
        lines.append(f"  {date} ({len(rows)} row{'s' if len(rows) > 1 else ''}): {counts(rows)}")
    for what, error in (("peaks", lambda r: r.gib_error), ("steps", lambda r: r.step_error)):
        worst = sorted((r for r in core if error(r) is not None), key=lambda r: -abs(error(r)))[:WORST]
        lines.append(f"Worst {what}:")
        lines += [f"  {r.describe(error(r))}" for r in worst]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python scripts/planned_vs_measured.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=Path, default=DEFAULT_ROWS, help="the measured rows (JSON list)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (default: aligned text)")
    parser.add_argument(
        "--step-sample",
        choices=("largest", "mean"),
        default="largest",
        help="the sample the step is predicted for: the largest, as the bench's predicted_step_s, or the "
        "mean, as the step was measured (default %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = compute(load_rows(args.rows), args.step_sample)
    print(render_markdown(results) if args.markdown else render_text(results))
    print()
    print(summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
