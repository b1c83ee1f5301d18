"""The benchmark: step time, tokens/s, samples/s, peak GPU memory, MFU, GPU busy share and compile
cost of every recipe, through the training core the worker runs, beside a bare PyTorch loop at its
own best setting, all at the same samples per optimizer step.

    python -m src.bench --shape 7b --recipes r2,r4 --candidates --out bench-out   # on a GPU machine
    python -m src.bench --shape 7b --recipes r4 --variants fast,fast+loader2 --rounds 3   # levers of ~5%
    python -m src.bench --shape 7b --recipes r4 --image-sizes mixed \
        --variants plain,fast+compile,fast+compile-ungrouped                    # images of COCO's sizes
    python -m src.bench --shape tiny --cpu --steps 2 --warmup 1                   # the CI smoke run
    recipe-run bench ...                                                          # the same, via the launcher

Models of the published 2B/7B shapes get random weights (src/fixtures/shapes.py; nothing is
downloaded); `--model-id DIR --dataset DIR` benchmarks a model and data of your own instead.
Every row runs `--samples-per-step` samples an optimizer step (micro-batch x accumulation).
`--image-sizes mixed` trains on images of COCO's frequent sizes in turn instead of one size (644x476;
src/bench/targets.py): the bare loop takes them in file order, as a user's loop would, and the core
groups micro-batches by size on a GPU (src/training/size_groups.py). Each row records its data's image
sizes and the share of its timed micro-batches whose images are of one size (`uniform_micro_batches_pct`).
Tokens a step, MFU and the planned peak come from the samples a row's timed steps took: the core's grouped
order takes a window's largest images first (patches_per_sample says how large), not the data's mean.
Variants per recipe:
  plain            the bare loop (src/bench/plain.py) at ITS best setting that fits: recompute off
                   where it fits, the largest micro-batch that fits (tried from the largest down,
                   CUDA OOM caught), accumulation to the same samples a step
  plain-recompute  the bare loop with recompute on, its largest fitting micro-batch
  fast             the core at the planner's chosen setting (src.planning.step_time.rank_settings)
  fast-cudnn       the same without cuDNN's attention kernels (what the core's choice of them buys)
  fast+varlen      the same with one attention call a vision block (src/models/vision_attention.py:
                   batched SDPA when the images share one size, else flash varlen), which the core
                   uses only when compiling
  fast+host-positions  the same with positions worked out on the host, not read back from the GPU
                   (src/training/host_positions.py)
  fast+loader2     the same with 2 data loader processes instead of 4 (the default until 2026-11-30)
  fast-nonblocking the same with the host waiting for each batch's copy to the GPU (the default
                   before 2026-12-01; src/training/config.py accelerator_options)
  fast+compile     the same with regional torch.compile (src/training/compile.py)
  fast+compile-varlen  compiled, with the model's own vision attention (graph breaks in every block)
  fast+compile-batched  compiled, images of one size through the varlen kernel too, not one batched
                   SDPA call a block (the compiled default before 2026-12-01)
  fast+compile-host-positions  compiled, positions read back from the GPU by the model (the compiled
                   default before 2026-12-01; fast+compile works them out on the host)
  fast+compile-log1  compiled, the loss read back from the GPU every step, not every 10, and the host
                   waiting for each batch's copy (the default before 2026-12-01)
  fast+compile4bit compiled, the 4-bit (QLoRA) decoder layers too (left eager by default)
  fast-ungrouped   micro-batches in plain shuffled order where images are of mixed sizes, not grouped
                   by size (what grouping buys); fast+compile-ungrouped the same, compiled
  fast-dequant     4-bit stages (r1, r3's stage 2) with bitsandbytes dequantizing the weights on every
                   forward and backward, as before src/models/dequantize.py (fast: once, where it fits)
  fast+compile-dequant  the same, compiled (its 4-bit layers stay eager: the compiled default before)
  lean             the core with recompute on, micro-batch --lean-micro-batch: the memory targets
  lean+compile     the same, compiled
  lean+offload     lean with what backward needs offloaded to host memory (src/training/offload.py);
                   lean+offload+compile the same, compiled (--lean-micro-batch 16: 16x1 at low memory)
`--ladder` adds the core's levers one at a time; `--candidates` times the planner's top 3 settings
(predicted against measured step time); `--end-to-end` times whole worker runs (import, load, first
step, train, save: end_to_end.py); `--profile plain,fast` profiles 2 extra steps of those variants (with
`--candidates`, cand1-3 too):
OUT/profile-*.txt (top CUDA- and CPU-time tables) and OUT/profile-*.json (the GPU's idle share between
kernels, GPU time by kernel kind, and each host sync by the Python line that made it). Writes
OUT/bench.json and OUT/bench.md.

`--rounds N` runs the whole list of rows N times, interleaved (every row once, then every row again,
...), so the host's slow drift hits every row alike: the core is host-bound and one row's step time
moves by up to 10% between runs, more than the 5% levers it should tell apart. Each row then reports
the median over rounds of its per-round step time (itself the median of the round's timed steps),
what derives from it (tokens/s, samples/s, MFU, x plain), the peak memory of its worst round, and
every round's step time; OUT/bench.json keeps every round's whole row under "rounds". The planner's
candidates are rows and run every round too; `--profile` profiles the first round only, and
`--end-to-end` runs each worker once, after the rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from src.bench.end_to_end import end_to_end
from src.bench.rows import PLAIN_VARIANTS, VARIANTS, Setting, bench_one
from src.bench.tables import combine_rounds, render_table, write_results
from src.bench.targets import IMAGE_SIZES, Target, targets
from src.recipes import resolve_recipe

log = logging.getLogger("bench")
LADDER = ("before", "+vision-no-grad", "+fused-adamw", "+no-input-cast", "lean", "fast")
DEFAULT_VARIANTS = "plain,plain-recompute,fast,fast+compile,lean"
CANDIDATES = 3  # --candidates times the planner's top three settings
CANDIDATE_LABELS = tuple(f"cand{i}" for i in range(1, CANDIDATES + 1))  # their rows' variant names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arg = parser.add_argument
    arg(
        "--shape",
        action="append",
        choices=["tiny", "2b", "7b", "qwen3-vl-8b"],
        help="model shape(s), random weights: Qwen2-VL 2B/7B, Qwen3-VL 8B; repeat for several",
    )
    arg("--model-id", help="a local model directory to benchmark instead of a shape")
    arg("--dataset", help="with --model-id: its data set (default: synthetic images, --image-sizes)")
    arg(
        "--image-sizes",
        choices=IMAGE_SIZES,
        default="one",
        help="the synthetic images: one size (644x476; the tiny shape: its fixtures' 112x112), or mixed: "
        "COCO's frequent sizes in turn (default %(default)s)",
    )
    arg("--recipes", default="r1,r2,r4", help="recipes (r3 = r2's stage then r1's; default %(default)s)")
    arg("--recipes-file", metavar="FILE", help="a TOML file of recipes of your own (README.md) to bench too")
    arg(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="comma list from " + ",".join([*PLAIN_VARIANTS, *VARIANTS]) + " (default %(default)s)",
    )
    arg("--ladder", action="store_true", help="add the one-lever-at-a-time steps (before ... fast)")
    arg("--candidates", action="store_true", help="also time the planner's top 3 settings (cand1-3)")
    arg(
        "--samples-per-step",
        "--batch-size",
        dest="samples_per_step",
        type=int,
        default=16,
        help="samples per optimizer step, every row (micro-batch x accumulation; default %(default)s)",
    )
    arg("--lean-micro-batch", type=int, default=4, help="lean's micro-batch (default %(default)s)")
    arg("--steps", type=int, default=8, help="measured steps after warm-up (default %(default)s)")
    arg("--warmup", type=int, default=3, help="warm-up steps, not measured (default %(default)s)")
    arg("--work", default=".bench-work", help="where models and data are built and cached")
    arg("--out", default="bench-out", help="where bench.json and bench.md go")
    arg("--cpu", action="store_true", help="run on the CPU (a smoke run: CPU timings are no speed claim)")
    arg(
        "--profile",
        nargs="?",
        const="plain,fast",
        default="",
        metavar="VARIANTS",
        help="profile 2 extra steps of these variants (default when given bare: plain,fast)",
    )
    arg(
        "--rounds",
        type=int,
        default=1,
        help="run every row this many times, interleaved; each row reports the median round and every "
        "round's step time (--profile: the first round only; --end-to-end runs once; default %(default)s)",
    )
    arg("--end-to-end", action="store_true", help="also time one whole worker run per recipe")
    arg(
        "--e2e-steps",
        type=int,
        default=10,
        help="optimizer steps of each end-to-end run (default %(default)s)",
    )
    arg("--e2e-args", default="", help='extra worker flags for --end-to-end, e.g. "--compile on"')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = use_recipes_file_of(args) or check_args(args)
    if problems:
        for problem in problems:
            print(f"python -m src.bench: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    out = Path(args.out)
    env = {
        **environment(device, argv),
        "image_sizes": "the data set's own" if args.dataset else args.image_sizes,
    }
    report = {"environment": env, "rows": [], "end_to_end": []}
    loaded = list(targets(args, device))
    plan = bench_plan(loaded, args, device)
    rounds: list[list[dict]] = [[] for _ in plan]  # every round's row, per row of the plan
    for round_number in range(1, args.rounds + 1):
        round_args = args if round_number == 1 else argparse.Namespace(**{**vars(args), "profile": ""})
        for measured, (target, label, stage, variant, setting) in zip(rounds, plan, strict=True):
            row = bench_one(target, stage, variant, setting, round_args, device, env)
            row["recipe"] = label
            measured.append(row)
            print(json.dumps({**row, "round": round_number}), flush=True)
            report["rows"] = [combine_rounds(found, env) for found in rounds if found]
            write_results(out, report)
    for target in loaded if args.end_to_end else ():
        for recipe_key in args.recipes.split(","):
            first_stage = stages_of(recipe_key)[0][1]
            setting = planned_settings(target, first_stage, args, device)[0]
            report["end_to_end"].append(end_to_end(target, recipe_key, setting, args, device))
            write_results(out, report)
    print(render_table(report))
    return 0


def bench_plan(loaded: list[Target], args, device: str) -> list[tuple]:
    """(target, recipe label, stage, variant, setting) of every row, in the order each round runs them."""
    return [
        (target, label, stage, variant, setting)
        for target in loaded
        for recipe_key in args.recipes.split(",")
        for label, stage in stages_of(recipe_key)
        for variant, setting in row_plan(target, stage, args, device)
    ]


def use_recipes_file_of(args) -> list[str]:
    """Add --recipes-file's recipes (so --recipes may name them); its problems, if any."""
    from src.recipes import recipes_file_problems

    if args.recipes_file is None:
        return []
    if problems := recipes_file_problems(args.recipes_file):
        return [f"--recipes-file: {problem}" for problem in problems]
    args.recipes_file = str(Path(args.recipes_file).resolve())  # the end-to-end workers get it too
    return []


def check_args(args) -> list[str]:
    problems = []
    if not args.shape and not args.model_id:
        problems.append("give --shape (tiny, 2b, 7b, qwen3-vl-8b) or --model-id DIR")
    if args.dataset and args.image_sizes != "one":
        problems.append("--image-sizes sets the synthetic images; --dataset brings its own: pass one of them")
    known = [*PLAIN_VARIANTS, *VARIANTS]
    unknown = [v for v in args.variants.split(",") if v not in known]
    if unknown:
        problems.append(f"--variants: unknown {unknown}; choose from {','.join(known)}")
    profilable = [*known, *(CANDIDATE_LABELS if args.candidates else ())]
    unknown = [v for v in filter(None, args.profile.split(",")) if v not in profilable]
    if unknown:
        problems.append(f"--profile: unknown {unknown}; choose from {','.join(profilable)}")
    for key in args.recipes.split(","):
        try:
            resolve_recipe(key)
        except (KeyError, ValueError) as error:
            problems.append(f"--recipes: {error}")
    for flag, value in (
        ("--samples-per-step", args.samples_per_step),
        ("--steps", args.steps),
        ("--lean-micro-batch", args.lean_micro_batch),
        ("--e2e-steps", args.e2e_steps),
        ("--rounds", args.rounds),
    ):
        if value < 1:
            problems.append(f"{flag} {value}: must be at least 1")
    return problems


def variants(args) -> list[str]:
    chosen = args.variants.split(",")
    if args.ladder:
        plain = [v for v in chosen if v in PLAIN_VARIANTS]
        rest = [v for v in chosen if v not in PLAIN_VARIANTS and v not in LADDER]
        chosen = [*plain, *LADDER, *rest]
    return chosen


def stages_of(recipe_key: str) -> list[tuple[str, object]]:
    """(row label, stage) pairs: a chain's stages each on the base model (same shapes as in the chain)."""
    recipe = resolve_recipe(recipe_key)
    if not recipe.stages:
        return [(recipe.name, recipe)]
    return [(f"{recipe.name}/{stage.name}", stage) for stage in recipe.stages]


def row_plan(target: Target, stage, args, device: str) -> list[tuple[str, Setting | None]]:
    """(variant, setting) of every row of one stage; the plain rows find their setting as they run."""
    n = args.samples_per_step
    micro = max(d for d in range(1, min(args.lean_micro_batch, n) + 1) if n % d == 0)
    lean = Setting(micro, n // micro, True)
    fast = planned_settings(target, stage, args, device)[0]
    fast_compiled = planned_settings(target, stage, args, device, compile_choices=(True,))[0]
    plan = []
    for variant in variants(args):
        if variant in PLAIN_VARIANTS:
            plan.append((variant, None))
            continue
        # fast... rows run at the planner's setting (compiled ones at its setting for a compiled run: compiled
        # layers save fewer activations); lean..., and the ladder's rungs below it, at lean's
        compiled = "+compile" in variant
        if variant.startswith("fast"):
            setting = fast_compiled if compiled else fast
        else:
            setting = replace(lean, compile=True) if compiled else lean
        plan.append((variant, setting))
    if args.candidates:
        ranked = planned_settings(target, stage, args, device, compile_choices=(False, True))
        plan += list(zip(CANDIDATE_LABELS, ranked[:CANDIDATES], strict=False))  # fewer may fit
    return plan


def planned_settings(target: Target, stage, args, device: str, compile_choices=(False,)) -> list[Setting]:
    """The planner's settings for this stage, best first (only those it predicts to fit)."""
    from src.planning.step_time import rank_settings

    patches, text_tokens = target.largest
    capacity = _capacity_bytes(device)
    ranked = rank_settings(
        target.memory_shape,
        stage,
        args.samples_per_step,
        capacity,
        patches,
        text_tokens,
        compile_choices=compile_choices,
        dequantize_choices=(True, False),  # as the launcher plans a 4-bit stage
    )
    fitting = [c for c in ranked if c.fits] or ranked[-1:]
    return [
        Setting(c.micro_batch, c.grad_accum, c.checkpointing, c.compile, c.predicted_step_s, c.dequantized)
        for c in fitting
    ]


def _capacity_bytes(device: str) -> int:
    """What the planner may fill: the GPU's usable memory, or (CPU smoke runs) the free RAM."""
    if device == "cuda":
        from src.utils.gpu import available_gpu_bytes

        return available_gpu_bytes()
    import psutil

    return psutil.virtual_memory().available


def environment(device: str, argv) -> dict:
    import peft
    import torch
    import transformers
    import trl

    from src.bench.measure import bf16_peak_tflops
    from src.utils.gpu import describe_device

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m src.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": describe_device(device),
        "bf16_peak_tflops": bf16_peak_tflops() if device == "cuda" else None,
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, trl, peft)},
    }


if __name__ == "__main__":
    raise SystemExit(main())
