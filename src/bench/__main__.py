"""The benchmark: tokens/s, step time, peak GPU memory, MFU and GPU utilisation of every recipe,
through the training core the worker runs, beside the plain hand-written loop.

    python -m src.bench --shape 7b --shape 2b --out bench-out        # on a GPU machine
    python -m src.bench --shape tiny --cpu --steps 2 --warmup 1       # the CI smoke run
    recipe-run bench ...                                              # the same, from the launcher

Models of the published 2B/7B shapes get random weights (src/models/shapes.py; nothing is
downloaded); `--model-id DIR --dataset DIR` benchmarks a model and data of your own instead.
Variants per recipe (VARIANTS): `plain` (the reference loop, src/bench/plain.py), `lean`
(checkpointing on: the memory targets), `fast` (everything on, checkpointing as the planner
decides: what a worker does by default); `--ladder` adds the steps between, one lever at a time.
Writes OUT/bench.json (rows and environment) and OUT/bench.md (the table).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from src.recipes import resolve_recipe
from src.utils.files import write_json_atomic, write_text_atomic

log = logging.getLogger("bench")
# RunOptions overrides per variant; the ladder switches the training core's levers on one by one.
OFF = {
    "frozen_vision_no_grad": False,
    "fused_optimizer": False,
    "adapter_input_casts": True,
    "dataloader_workers": 0,
    "gradient_checkpointing": True,
}
VARIANTS = {
    "before": OFF,
    "+vision-no-grad": {**OFF, "frozen_vision_no_grad": True},
    "+fused-adamw": {**OFF, "frozen_vision_no_grad": True, "fused_optimizer": True},
    "+no-input-cast": {"dataloader_workers": 0, "gradient_checkpointing": True},
    "lean": {"gradient_checkpointing": True},  # = +loader-workers: every lever but the last
    "fast": {},  # + no recompute when the planner says the activations fit
}
LADDER = ("before", "+vision-no-grad", "+fused-adamw", "+no-input-cast", "lean", "fast")
IMAGE_SIZE = (644, 476)  # 391 image tokens a sample, as in the reference figures
SAMPLE_STATS_SAMPLES = 16


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arg = parser.add_argument
    arg("--shape", action="append", choices=["tiny", "2b", "7b"], help="model shape(s); repeat for several")
    arg("--model-id", help="a local model directory to benchmark instead of a shape")
    arg("--dataset", help="with --model-id: its data set (default: synthetic 644x476 images)")
    arg("--recipes", default="r1,r2,r4", help="recipes (r3 = r2's stage then r1's; default %(default)s)")
    arg("--variants", default="plain,lean,fast", help="comma list from plain," + ",".join(VARIANTS))
    arg("--ladder", action="store_true", help="add the one-lever-at-a-time steps (before ... fast)")
    arg("--batch-size", type=int, default=4, help="samples per optimizer step (default %(default)s)")
    arg("--steps", type=int, default=8, help="measured steps after warm-up (default %(default)s)")
    arg("--warmup", type=int, default=3, help="warm-up steps, not measured (default %(default)s)")
    arg("--work", default=".bench-work", help="where models and data are built and cached")
    arg("--out", default="bench-out", help="where bench.json and bench.md go")
    arg("--cpu", action="store_true", help="run on the CPU (a smoke run: CPU timings are no speed claim)")
    arg("--profile", action="store_true", help="also profile 2 steps of each recipe's `before` variant")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = check_args(args)
    if problems:
        for problem in problems:
            print(f"python -m src.bench: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    out = Path(args.out)
    env = environment(device, argv)
    report = {"environment": env, "rows": []}
    for target in targets(args, device):
        for recipe_key in args.recipes.split(","):
            for label, stage in stages_of(recipe_key):
                for variant in variants(args):
                    row = bench_one(target, stage, variant, args, device, env)
                    row["recipe"] = label
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    write_results(out, report)
    print(render_table(report))
    return 0


def check_args(args) -> list[str]:
    problems = []
    if not args.shape and not args.model_id:
        problems.append("give --shape (tiny, 2b, 7b) or --model-id DIR")
    unknown = [v for v in args.variants.split(",") if v != "plain" and v not in VARIANTS]
    if unknown:
        problems.append(f"--variants: unknown {unknown}; choose from plain,{','.join(VARIANTS)}")
    for key in args.recipes.split(","):
        try:
            resolve_recipe(key)
        except (KeyError, ValueError) as error:
            problems.append(f"--recipes: {error}")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1)):
        if value < least:
            problems.append(f"{flag} {value}: must be at least {least}")
    return problems


def variants(args) -> list[str]:
    chosen = args.variants.split(",")
    if args.ladder:
        chosen = ["plain", *LADDER] if "plain" in chosen else list(LADDER)
    return chosen


def stages_of(recipe_key: str) -> list[tuple[str, object]]:
    """(row label, stage) pairs: a chain's stages each on the base model (same shapes as in the chain)."""
    recipe = resolve_recipe(recipe_key)
    if not recipe.stages:
        return [(recipe.name, recipe)]
    return [(f"{recipe.name}/{stage.name}", stage) for stage in recipe.stages]


@dataclass
class Target:
    """One model and its data, with what every row of it shares (read once, not once a row)."""

    label: str
    model_dir: Path
    data_dir: Path
    dataset: object  # the training conversations, as the worker builds them
    processor: object
    stats: dict  # mean tokens, patches and labels a sample (sample_stats)
    memory_shape: object  # src.planner.ModelShape
    flop_shape: object  # src.bench.measure.FlopShape

    @classmethod
    def load(cls, label: str, model_dir: Path, data_dir: Path) -> Target:
        from src.bench.measure import FlopShape
        from src.data.dataset import build_dataset
        from src.models.loader import load_processor, model_family
        from src.planner import ModelShape

        processor = load_processor(str(model_dir))
        dataset, _ = build_dataset(str(data_dir), "train", model_family(str(model_dir)), processor)
        stats = sample_stats(dataset, processor)
        shapes = ModelShape.from_model_dir(model_dir), FlopShape.from_model_dir(model_dir)
        return cls(label, model_dir, data_dir, dataset, processor, stats, *shapes)


def targets(args, device: str):
    """A Target for each model asked, building the shapes' models and data where missing."""
    work = Path(args.work)
    if args.model_id:
        data = Path(args.dataset or _synthetic_data(work))
        yield Target.load(Path(args.model_id).name, Path(args.model_id), data)
    for shape in args.shape or []:
        if shape == "tiny":
            from src.fixtures import build_test_fixtures

            yield Target.load("tiny", *build_test_fixtures(work / "tiny"))
            continue
        from src.models.shapes import build_shape_model

        model_dir = work / shape
        if not (model_dir / "config.json").is_file():
            build_shape_model(shape, model_dir, device=device)
        yield Target.load(shape, model_dir, _synthetic_data(work))


def _synthetic_data(work: Path) -> Path:
    from src.data.synthetic import write_dataset

    data = work / "data-644x476"
    if not (data / "train" / "metadata.jsonl").is_file():
        write_dataset(data, train=32, test=1, size=IMAGE_SIZE)
    return data


def bench_one(target: Target, stage, variant: str, args, device, env) -> dict:
    """One (model, stage, variant): steps timed after warm-up, peak memory, utilisation, MFU."""
    from src.bench.measure import StepTimer, UtilisationSampler, median

    _release_gpu_memory()
    sampler = UtilisationSampler()
    timer = StepTimer(args.warmup, on_warm=sampler.start)
    started = time.monotonic()
    if variant == "plain":
        checkpointing = _run_plain(target, stage, args, device, timer)
    else:
        checkpointing = _run_core(target, stage, variant, args, device, timer)
    utilisation = sampler.stop()
    step_s = median(timer.measured())
    tokens = target.stats["tokens"] * args.batch_size
    row = {
        "shape": target.label,
        "recipe": stage.name,
        "variant": variant,
        "batch_size": args.batch_size,
        "checkpointing": checkpointing,
        "steps_measured": len(timer.measured()),
        "step_s": _round(step_s, 4),
        "tokens_per_step": round(tokens),
        "tokens_s": _round(tokens / step_s if step_s else None, 1),
        "peak_gib": _peak_gib(),
        "gpu_util_pct": utilisation,
        "wall_s": round(time.monotonic() - started, 1),
        **_predicted_and_flops(target, stage, args.batch_size, checkpointing, step_s, env),
    }
    _release_gpu_memory()
    return row


def _run_core(target: Target, stage, variant, args, device, timer) -> bool:
    """The worker's own path: prepare_stage (collator, trainer, freeze, LoRA, quantization)."""
    from src.training.run import RunOptions, prepare_stage

    out = Path(args.work) / "runs" / f"{stage.name}-{variant}"
    out.mkdir(parents=True, exist_ok=True)
    opts = RunOptions(
        model_id=str(target.model_dir),
        dataset=str(target.data_dir),
        output_dir=out,
        device=device,
        max_steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        save_steps=0,
    )
    opts = replace(opts, **VARIANTS[variant])
    callbacks = [timer.as_trainer_callback()]
    if args.profile and variant == "before":
        callbacks.append(_profiler_callback(args, stage.name, shape=target.model_dir.name))
    prepared = prepare_stage(stage.name, stage, opts.model_id, opts, out, callbacks=callbacks)
    prepared.trainer.train()
    return bool(prepared.trainer.args.gradient_checkpointing)


def _run_plain(target: Target, stage, args, device, timer) -> bool:
    from src.bench.plain import prebuilt_batches, train_plain
    from src.models.loader import model_family
    from src.training.run import load_wrapped_model

    family = model_family(str(target.model_dir))
    model, _ = load_wrapped_model(stage, str(target.model_dir), device, family)
    batches = prebuilt_batches(target.dataset, target.processor, args.batch_size, device)
    train_plain(model, batches, args.warmup + args.steps, stage.learning_rate, timer, device)
    return True  # the plain loop always recomputes: it is the reference


def sample_stats(dataset, processor, count: int = SAMPLE_STATS_SAMPLES) -> dict:
    """Mean tokens, image patches and label tokens per sample, as the training collator builds them."""
    from src.data.collators import AssistantOnlyCollator

    collate = AssistantOnlyCollator(processor)
    rows = [dataset[i % len(dataset)] for i in range(count)]
    batch = collate(rows)
    grid = batch["image_grid_thw"]
    return {
        "tokens": float(batch["attention_mask"].sum()) / count,
        "patches": float(grid.prod(-1).sum()) / count,
        "labels": float((batch["labels"] != -100).sum()) / count,
    }


def _predicted_and_flops(target: Target, stage, batch_size, checkpointing, step_s, env) -> dict:
    """The planner's peak for this run, and the model FLOPs behind MFU."""
    from src.bench.measure import step_flops
    from src.planner import estimate_stage_memory

    stats = target.stats
    patches = round(stats["patches"])
    text = round(stats["tokens"] - patches // 4)
    estimate = estimate_stage_memory(target.memory_shape, stage, batch_size, patches, text, checkpointing)
    flops = step_flops(target.flop_shape, stage, batch_size, patches, text, stats["labels"])
    peak = env["bf16_peak_tflops"]
    return {
        "predicted_gib": round(estimate.gib, 2),
        "step_flops": round(flops),
        "mfu_pct": _round(100 * flops / step_s / (peak * 1e12), 1) if peak and step_s else None,
    }


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


def _profiler_callback(args, name: str, shape: str):
    """Profile two steps after warm-up and keep the top of the table: where the time goes."""
    import torch
    from transformers import TrainerCallback

    table = Path(args.out) / f"profile-{shape}-{name}.txt"

    class _Profile(TrainerCallback):
        profiler = None

        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step == args.warmup:
                self.profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                )
                self.profiler.start()

        def on_step_end(self, targs, state, control, **kwargs):
            if self.profiler and state.global_step == args.warmup + 2:
                self.profiler.stop()
                table.parent.mkdir(parents=True, exist_ok=True)
                averages = self.profiler.key_averages()
                text = averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60)
                text += "\n" + averages.table(
                    sort_by="cpu_time_total", row_limit=20, max_name_column_width=60
                )
                table.write_text(text)
                self.profiler = None

    return _Profile()


def _release_gpu_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _round(value, digits):
    return None if value is None else round(value, digits)


def write_results(out: Path, report: dict) -> None:
    write_json_atomic(out / "bench.json", report)
    write_text_atomic(out / "bench.md", render_table(report) + "\n")


def render_table(report: dict) -> str:
    """The markdown table: each row against the plain row of its shape and recipe."""
    env = report["environment"]
    plain = {(r["shape"], r["recipe"]): r["tokens_s"] for r in report["rows"] if r["variant"] == "plain"}
    lines = [
        f"{env['device']['name']} ({env['device'].get('uuid') or 'cpu'}), bf16 peak measured "
        f"{env['bf16_peak_tflops']} TFLOP/s, {env['date']}, "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
        "| shape | recipe | variant | ckpt | step s | tokens/s | x plain | peak GiB | planned GiB | MFU % "
        "| GPU util % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        base = plain.get((r["shape"], r["recipe"]))
        speedup = f"{r['tokens_s'] / base:.2f}" if base and r["tokens_s"] else "-"
        cells = [
            r["shape"],
            r["recipe"],
            r["variant"],
            "on" if r["checkpointing"] else "off",
            r["step_s"],
            r["tokens_s"],
            speedup,
            r["peak_gib"],
            r["predicted_gib"],
            r["mfu_pct"],
            r["gpu_util_pct"],
        ]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
