"""Decoding speed of the evaluator: today's path (batch 8, file order) beside the new one, in one run.

    python -m src.bench.decoding --shape 7b --samples 256 --max-new-tokens 64 --out eval-bench   # a GPU
    python -m src.bench.decoding --model-dir DIR --dataset DIR --samples 256 --out eval-bench
    python -m src.bench.decoding --model-dir fixtures/model --dataset fixtures/data --cpu \\
        --samples 4 --max-new-tokens 4 --out /tmp/eval-bench                               # smoke run
    python -m src.bench.decoding --shape 7b --image-sizes mixed --out eval-bench         # COCO's sizes
    python -m src.bench.decoding --shape 7b --image-sizes mixed --paths sorted --profile sorted \\
        --out eval-bench                                            # where a decoding step's time goes

`--shape 7b|2b` builds a random-weight model of the published shape (src/fixtures/shapes.py) and synthetic
test images under OUT, unless --model-dir / --dataset name your own. `--image-sizes one` (the default):
every image 644x476 (391 image tokens), in OUT/data-N; `mixed`: COCO's frequent sizes in turn
(src/fixtures/synthetic.py, COCO_SIZES: 640x480, 480x640, 640x427, ...), in OUT/data-coco-sizes-N, as an
evaluation on COCO decodes them. A data set of your own (--dataset) has its own sizes, so it takes no
--image-sizes. The meta records which, and how many decoded images had each size.
Paths (--paths): `today` (batch 8, images in file order, dynamic cache: what evaluation did before),
`sorted` (batch sized from free GPU memory, images grouped by size), `static` (as sorted, with a static
KV cache, so transformers compiles the decoding step on a GPU; its first batch of each shape pays the
compile, so it runs once untimed first), `fast` and `fast-static` (as sorted and static, with the fast
attention calls: the LLM's decoding steps with query heads grouped onto their key/value heads, no copy of
the KV cache, and the vision tower in one call a block; src/eval/predict.py FAST_ATTENTION). The model is
loaded once and every path decodes the same images.

`--profile sorted[,static...]` (paths among --paths): after that path's timed run, its first batch is
decoded once more step by step (prefill vs decoding-step ms, no profiler) and once under torch.profiler;
writes OUT/profile-decode-<path>.txt (top ops tables) and .json (ms per step, GPU busy share, top ops by
self CUDA and CPU time, host syncs): src/bench/decode_profile.py.

Prints and writes OUT/eval_bench.json and OUT/eval_bench.md: per path images/s (whole predict loop:
image loading, processor, generate), decoded tokens/s (answer tokens up to each end token), decoding
steps, batch size, peak GPU memory, and how many answers equal the reference path's (today when it runs,
else the first of --paths). Random weights never emit the end
token, so every answer runs to --max-new-tokens: the worst case, which is what the target measures
(issue 14: >= 16 images/s for the 7B shape, 256 images, 64-token answers, one H200).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from src.bench.targets import IMAGE_SIZE, IMAGE_SIZES, image_size_counts  # as the training bench
from src.data.dataset import load_records
from src.eval.predict import CPU_EVAL_BATCH, GenerationStats, load_for_eval, predict_records
from src.utils.files import write_json_atomic, write_text_atomic

log = logging.getLogger("eval-bench")
PATHS = {
    "today": {
        "batch_size": CPU_EVAL_BATCH,
        "sort_by_size": False,
        "decode": "plain",
        "fast_attention": False,
    },
    "sorted": {"batch_size": "auto", "sort_by_size": True, "decode": "plain", "fast_attention": False},
    "static": {"batch_size": "auto", "sort_by_size": True, "decode": "static", "fast_attention": False},
    "fast": {"batch_size": "auto", "sort_by_size": True, "decode": "plain", "fast_attention": True},
    "fast-static": {"batch_size": "auto", "sort_by_size": True, "decode": "static", "fast_attention": True},
}
TARGET_IMAGES_PER_S = 16.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.bench.decoding",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arg = parser.add_argument
    arg("--shape", choices=["2b", "7b"], help="build a random-weight model of this shape under OUT")
    arg("--model-dir", help="a model directory (merged or base) instead of --shape")
    arg("--dataset", help="an imagefolder data set; default: synthetic images under OUT (--image-sizes)")
    arg(
        "--image-sizes",
        choices=IMAGE_SIZES,
        default=None,
        help="the synthetic test images: one (every image 644x476, the default) or mixed (COCO's frequent"
        " sizes in turn, as a COCO evaluation decodes); not with --dataset, which has its own sizes",
    )
    arg("--samples", type=int, default=256, help="test images to decode (default: %(default)s)")
    arg("--max-new-tokens", type=int, default=64, help="answer length cap (default: %(default)s)")
    arg(
        "--paths",
        default="today,sorted",
        help=f"comma-separated, of {','.join(PATHS)} (default: %(default)s)",
    )
    arg(
        "--batch-size",
        type=int,
        default=None,
        help="fix the batch of the sorted/static paths (default: auto)",
    )
    arg(
        "--profile",
        default="",
        metavar="PATH[,PATH...]",
        help="after the timed run of each of these paths (of --paths), decode its first batch step by step"
        " and under torch.profiler; writes OUT/profile-decode-<path>.txt and .json",
    )
    arg("--out", required=True, help="directory for eval_bench.json / .md (and a built model and data)")
    arg("--cpu", action="store_true", help="run on the CPU (the smoke run)")
    return parser


def usage_problems(args) -> list[str]:
    problems = []
    if bool(args.shape) == bool(args.model_dir):
        problems.append("give one of --shape (a random-weight model) or --model-dir")
    elif args.model_dir and not (Path(args.model_dir) / "config.json").is_file():
        problems.append(f"--model-dir {args.model_dir}: no config.json there; pass a model directory")
    unknown = [p for p in args.paths.split(",") if p not in PATHS]
    if unknown:
        problems.append(f"--paths {args.paths}: unknown {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    if args.image_sizes and args.dataset:
        problems.append(
            f"--image-sizes {args.image_sizes} with --dataset {args.dataset}: --image-sizes shapes the"
            " synthetic images only (your data set has its own sizes); drop one of them"
        )
    profiled = [p for p in args.profile.split(",") if p]
    if wrong := [p for p in profiled if p not in PATHS]:
        problems.append(
            f"--profile {args.profile}: unknown {', '.join(wrong)}; choose from {', '.join(PATHS)}"
        )
    elif absent := [p for p in profiled if p not in args.paths.split(",")]:
        problems.append(f"--profile {args.profile}: {', '.join(absent)} not among --paths {args.paths}")
    if args.samples < 1 or args.max_new_tokens < 1:
        problems.append("--samples and --max-new-tokens must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size}: use at least 1 (or leave it out: auto)")
    return problems


def prepare(args, out: Path, device: str) -> tuple[str, str]:
    """(model dir, data dir): given ones, or built under OUT (kept between runs)."""
    model_dir = args.model_dir
    if model_dir is None:
        from src.fixtures.shapes import build_shape_model

        model_dir = out / f"model-{args.shape}"
        if not (model_dir / "config.json").is_file():
            log.info("building a random %s model in %s", args.shape, model_dir)
            build_shape_model(args.shape, model_dir, device=device)
    dataset = args.dataset or synthetic_data(out, args.samples, args.image_sizes == "mixed")
    return str(model_dir), str(dataset)


def synthetic_data(out: Path, samples: int, mixed: bool) -> Path:
    """`samples` synthetic test images of one size or of COCO's sizes, written once: kept while the
    folder's synthetic.json says it holds what is asked."""
    import shutil

    from src.fixtures.synthetic import COCO_SIZES, SETTINGS_FILE, dataset_settings, write_dataset

    sizes = COCO_SIZES if mixed else None
    data = out / (f"data-coco-sizes-{samples}" if mixed else f"data-{samples}")
    wanted = dataset_settings(1, samples, "source", 0, IMAGE_SIZE, 2, (0.2, 0.45), sizes)
    settings = data / SETTINGS_FILE
    if not settings.is_file() or json.loads(settings.read_text()) != wanted:
        log.info("writing %d synthetic test images in %s", samples, data)
        shutil.rmtree(data, ignore_errors=True)
        write_dataset(data, train=1, test=samples, size=IMAGE_SIZE, sizes=sizes)
    return data


def time_path(
    name: str, model, processor, family, records, device: str, args, out: Path
) -> tuple[dict, list[str]]:
    """One path over all records: its row and its answers; then its profile, if --profile names it."""
    import torch

    settings = dict(PATHS[name])
    if args.batch_size and settings["batch_size"] == "auto":
        settings["batch_size"] = args.batch_size
    run = dict(family=family, device=device, max_new_tokens=args.max_new_tokens, **settings)
    if settings["decode"] == "static":  # compile on an untimed pass, as a long evaluation amortises it
        predict_records(model, processor, records, **run)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stats = GenerationStats()
    started = time.perf_counter()
    predictions = predict_records(model, processor, records, stats=stats, **run)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    row = {
        "path": name,
        **settings,
        **stats.summary(),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(records) / seconds, 3),
        "generate_images_per_s": stats.summary()["images_per_s"],
        "decoded_tokens_per_image": round(stats.decoded_tokens / max(1, stats.images), 1),
        "peak_gpu_mem_gib": round(peak, 2) if peak is not None else None,
    }
    log.info("%s: %s", name, json.dumps(row))
    if name in args.profile.split(","):
        from src.bench.decode_profile import profile_path

        summary = profile_path(name, model, processor, records, run, stats.batch_size, out)
        keep = ("decoding_steps", "ms_per_step", "gpu_busy_share", "host_syncs")
        row["profile"] = {key: summary[key] for key in keep}
        row["profile"].update({k: v for k, v in summary["steps_unprofiled"].items() if k != "decode_ms"})
    return row, [p.text for p in predictions]


def render(rows: list[dict], meta: dict) -> str:
    head = [
        "path",
        "batch",
        "sorted",
        "decode",
        "fast attention",
        "images/s",
        "decoded tokens/s",
        "steps",
        "tokens/image",
    ]
    head += ["seconds", "peak GiB", f"same answers as {meta['reference']}"]
    lines = [
        f"# Evaluation decoding speed: {meta['model']}",
        "",
        f"{meta['images']} images, --max-new-tokens {meta['max_new_tokens']}, device {meta['device']}"
        f" ({meta['device_name']}), transformers {meta['transformers']}, torch {meta['torch']}.",
        f"Image sizes: {meta['image_sizes']} ("
        + ", ".join(f"{size} x{count}" for size, count in meta["image_size_counts"].items())
        + ").",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for r in rows:
        cells = [
            r["path"],
            r["batch_size"],
            r["sort_by_size"],
            r["decode"],
            r["fast_attention"],
            r["images_per_s"],
        ]
        cells += [r["decoded_tokens_per_s"], r["decoding_steps"], r["decoded_tokens_per_image"], r["seconds"]]
        cells += [r["peak_gpu_mem_gib"] if r["peak_gpu_mem_gib"] is not None else "-", r["same_as_reference"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", meta["note"], ""]
    for r in rows:
        if "profile" in r:
            lines += [render_profile(r), ""]
    return "\n".join(lines)


def render_profile(row: dict) -> str:
    """One line for a profiled path (its JSON in OUT/profile-decode-<path>.json)."""
    p = row["profile"]
    busy = f", GPU busy {p['gpu_busy_share']:.0%} of it" if p["gpu_busy_share"] is not None else ""
    return (
        f"Profile of {row['path']}'s first batch ({p['decoding_steps']} steps): prefill {p['prefill_ms']} ms,"
        f" decoding step {p['decode_ms_median']} ms (median, unprofiled); {p['ms_per_step']} ms a step"
        f" under the profiler{busy}. Tables: profile-decode-{row['path']}.txt, .json."
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if problems := usage_problems(args):
        print("error: " + "\nerror: ".join(problems), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import transformers

    from src.utils.gpu import describe_device, resolve_device

    device = resolve_device(args.cpu)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, dataset = prepare(args, out, device)
    records = load_records(dataset, "test")[0][: args.samples]
    model, processor, family = load_for_eval(model_dir, device)
    predict_records(model, processor, records[:2], family, device, 2, max_new_tokens=2)  # warm-up
    paths = args.paths.split(",")
    reference = "today" if "today" in paths else paths[0]
    rows, expected = [], None
    for name in paths:
        row, answers = time_path(name, model, processor, family, records, device, args, out)
        expected = answers if name == reference else expected
        row["same_as_reference"] = (
            f"{sum(a == b for a, b in zip(answers, expected, strict=True))}/{len(answers)}"
            if expected
            else "-"
        )
        rows.append(row)
    capped = all(r["decoded_tokens_per_image"] >= args.max_new_tokens for r in rows)
    note = (
        "Every answer ran to --max-new-tokens (random weights never emit the end token): the worst case."
        if capped
        else "Answers ended early where the model emitted its end token; generate() stops when all have."
    )
    best = max(rows, key=lambda r: r["images_per_s"])
    note += f" Best: {best['path']} at {best['images_per_s']:.2f} images/s"
    if device.startswith("cuda"):
        met = "met" if best["images_per_s"] >= TARGET_IMAGES_PER_S else "not met"
        note += f" (target {TARGET_IMAGES_PER_S:.0f} images/s: {met})"
    meta = {
        "model": model_dir,
        "dataset": dataset,
        "images": len(records),
        "image_sizes": args.image_sizes or ("own (--dataset)" if args.dataset else "one"),
        "image_size_counts": image_size_counts([[(r.width, r.height)] for r in records]),
        "max_new_tokens": args.max_new_tokens,
        "reference": reference,
        "device": device,
        "device_name": describe_device(device)["name"],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "note": note + ".",
    }
    write_json_atomic(out / "eval_bench.json", {"meta": meta, "rows": rows})
    markdown = render(rows, meta)
    write_text_atomic(out / "eval_bench.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
