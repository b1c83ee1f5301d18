"""Evaluate a trained recipe (or the untrained base) on a held-out split: metrics.json + predictions.jsonl.

    python -m src.eval.evaluate outputs/r4-joint --dataset fixtures/data --cpu     # the whole test split
    python -m src.eval.evaluate outputs/r4-joint --dataset fixtures/data --max-samples 32 --cpu
    python -m src.eval.evaluate outputs/r1-llm-only outputs/r2-vision-only ...   # one process, in turn
    python -m src.eval.evaluate outputs/base --base fixtures/tiny-qwen2-vl --dataset fixtures/data

The first forms find the final model of each worker output directory (`status.json["output"]`:
`OUT/adapter/`, or r3's `OUT/stage2-llm/adapter/` on top of `OUT/stage1-vision/merged/`); the
last (`--base MODEL_ID`) evaluates a model as it is, the zero-shot baseline, and writes into
OUTPUT_DIR. Each writes, atomically, into its output directory:

  * `metrics.json`: everything `src.scoring.metrics.detection_metrics` returns (precision, recall, f1,
    tp/fp/fn at IoU 0.5, map_50, map_50_95, mean_iou, parse_rate, per_label, per_size, num_images), plus
    `class_agnostic` ({precision, recall, f1, mean_iou}: boxes matched whatever their label, which
    separates "found it" from "named it"), `intervals` ({metric: {value, low, high}}: 95% bootstrap
    intervals over the test images, src/scoring/bootstrap.py), `truncated` (answers cut off by
    max_new_tokens: each also counts as unparsed or short of boxes, never silently) and `eval` (model,
    adapter, dataset, split, device, batch size, max_new_tokens and the longest answer it was sized
    from, seconds, and the decoding speed: images_per_s, decoded_tokens_per_s...);
  * `predictions.jsonl`: one line per image: image, width, height, truths, crowd (regions ignored, as
    pycocotools ignores iscrowd; only on images that have them), predictions (boxes in original-image
    pixels), text (the raw answer, special tokens kept), parsed, malformed.

--max-new-tokens auto (the default) sizes the answer budget from the longest answer in the data set's
train split and in the evaluated images (src.data.dataset.answer_budget: every coordinate at its
longest, plus a quarter and 16 tokens): a dense image of 20 boxes gets room for all of them.

The whole split is evaluated unless --max-samples (alias --eval-samples) caps it. Batches are sized from
free GPU memory (--batch-size auto; 8 on the CPU) with images of similar size together. Called from the
worker, progress goes to stdout as RR_PROGRESS "eval" events (images done / total), which the launcher's
live table shows with an ETA.

Exit codes (the worst over all directories): 0 done, 2 bad input (no finished run there, missing
dataset split), 1 evaluation failed. The same functions from Python: `evaluate_output(output_dir,
dataset, ...)`, `evaluate_base(model_id, dataset, out_dir, ...)`; both return the metrics dict.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from src.contract import exits
from src.contract.flags import BY_DEST, int_or_auto
from src.data.boxes import Box
from src.data.dataset import DEFAULT_PROMPT, load_records
from src.data.records import SPLITS, DatasetError
from src.eval.predict import (
    DECODE_MODES,
    GenerationStats,
    Prediction,
    load_for_eval,
    predict_records,
    resolve_model,
)
from src.utils.files import read_json, write_json_atomic

METRICS_FILE, PREDICTIONS_FILE = "metrics.json", "predictions.jsonl"
PROGRESS_EVERY_S = 1.0  # at most one progress event a second (the first and last always go out)
log = logging.getLogger("recipe-eval")


class EvaluationError(ValueError):
    """Nothing to evaluate as asked; the message says what is missing."""


def final_model_of(output_dir: str | Path) -> Path:
    """The model a finished worker run produced, from its status.json (see the worker contract)."""
    from src.eval.predict import locate

    output_dir = Path(output_dir)
    status = read_json(output_dir / "status.json")
    if status is None:
        raise EvaluationError(f"{output_dir}: no readable status.json; is this a worker output directory?")
    if status.get("status") != "succeeded" or not status.get("output"):
        raise EvaluationError(
            f"{output_dir}: the run's status is {status.get('status')!r}; only a succeeded run has a model"
        )
    model = Path(locate(status["output"], output_dir))
    if not model.is_dir():
        raise EvaluationError(f"{output_dir}: status.json names {status['output']}, which is not there")
    return model


def evaluate_output(output_dir: str | Path, dataset: str, **options) -> dict:
    """Evaluate the final model of a worker output dir; writes OUT/metrics.json and OUT/predictions.jsonl.

    `options` are evaluate_model's: split, max_samples, device, batch_size, max_new_tokens, prompt,
    sort_by_size, decode, progress_stage (default "eval": the worker's stage name), image_root.
    """
    options.setdefault("progress_stage", "eval")
    return evaluate_model(final_model_of(output_dir), dataset, output_dir, **options)


def evaluate_base(model_id: str, dataset: str, out_dir: str | Path, **options) -> dict:
    """The zero-shot baseline: `model_id` as it is, same files as evaluate_output, into out_dir."""
    options.setdefault("progress_stage", "baseline")
    return evaluate_model(model_id, dataset, out_dir, **options)


def progress_reporter(stage: str | None, split: str = "test") -> Callable[[int, int], None] | None:
    """on_progress for predict_records: RR_PROGRESS "eval" events (done, total, rate, the split's name),
    at most one a second; None (no events) when stage is None, as for the command line, which logs instead."""
    if stage is None:
        return None
    from src.contract import progress

    started, last = time.monotonic(), [-PROGRESS_EVERY_S]

    def report(done: int, total: int) -> None:
        now = time.monotonic() - started
        if 0 < done < total and now - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = now
        rate = round(done / now, 3) if done and now > 0 else None
        timing = {"elapsed_s": round(now, 2), "images_per_s": rate}
        progress.emit("eval", stage=stage, split=split, done=done, total=total, **timing)

    return report


def evaluate_model(
    model_path: str | Path,
    dataset: str,
    out_dir: str | Path,
    split: str = "test",
    max_samples: int | None = None,
    device: str = "cpu",
    batch_size: int | str = "auto",
    max_new_tokens: int | str = "auto",
    prompt: str = DEFAULT_PROMPT,
    sort_by_size: bool = True,
    decode: str = "plain",
    progress_stage: str | None = None,
    image_root: str | Path | None = None,
    pixels: tuple[int | None, int | None] = (None, None),
    val_fraction: float = 0.0,
    loaded: tuple | None = None,
) -> dict:
    """Predict on `split` (its first `max_samples` records; None or 0: all), score, write both files.
    `val_fraction` above 0 puts a validation split in use (src.data.dataset.read_raw_records).
    `loaded` (model, processor, family): the model of `model_path` already in memory, used instead of
    loading it (the worker's trained model, src.training.run.ready_for_generation).

    progress_stage names the RR_PROGRESS stage of the "eval" events sent while predicting (None: none).
    max_new_tokens "auto" sizes the answer budget from the data (answer_budget_for).
    """
    from src.scoring.metrics import detection_metrics

    out_dir = Path(out_dir)
    # raises DatasetError naming the fix
    records, _ = load_records(dataset, split, image_root=image_root, val_fraction=val_fraction)
    records = records[:max_samples] if max_samples else records
    started = time.time()
    if loaded is None:
        model, processor, family = load_for_eval(model_path, device, search_root=out_dir, pixels=pixels)
    else:
        model, processor, family = loaded
    longest = None
    if max_new_tokens == "auto":
        max_new_tokens, longest = answer_budget_for(
            dataset, records, processor, family, image_root, val_fraction
        )
        log.info("max_new_tokens %d: the longest answer is at most %d tokens", max_new_tokens, longest)
    ready = time.time()
    stats = GenerationStats()
    predictions = predict_records(
        model,
        processor,
        records,
        family,
        device,
        batch_size,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        sort_by_size=sort_by_size,
        decode=decode,
        stats=stats,
        on_progress=progress_reporter(progress_stage, split),
    )
    predicted = time.time()
    samples = [(p.boxes, p.truths, p.parsed, p.crowd) for p in predictions]
    base, adapter = resolve_model(model_path, out_dir)
    truncated = sum(p.truncated for p in predictions)
    if truncated:
        log.warning(
            "%d of %d answers were cut off at max_new_tokens=%d; pass a larger --max-new-tokens",
            truncated,
            len(predictions),
            max_new_tokens,
        )
    metrics = {
        **detection_metrics(samples),
        "truncated": truncated,
        "class_agnostic": class_agnostic_metrics(samples),
        "intervals": image_intervals(predictions),
        "eval": {
            "model": str(model_path),
            "base_model": base,
            "adapter": adapter,
            "family": family,
            "dataset": str(dataset),
            "split": split,
            "val_fraction": val_fraction,
            "num_samples": len(records),
            "device": device,
            "batch_size_from_memory": batch_size == "auto" and str(device).startswith("cuda"),
            "sort_by_size": sort_by_size,
            "decode": decode,
            "max_new_tokens": max_new_tokens,
            "longest_answer_tokens": longest,  # None: max_new_tokens was given, not sized
            "in_memory": loaded is not None,
            "load_seconds": round(ready - started, 2),
            "predict_seconds": round(predicted - ready, 2),
            "seconds": round(time.time() - started, 2),
            **stats.summary(),
        },
    }
    write_predictions(out_dir / PREDICTIONS_FILE, predictions)
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    return metrics


def answer_budget_for(
    dataset: str,
    records: list,
    processor,
    family: str,
    image_root: str | Path | None = None,
    val_fraction: float = 0.0,
) -> tuple[int, int]:
    """(max_new_tokens, longest answer in tokens) from the train split's answers and these records'.

    The train split is read without opening its images (labels and box counts are all it takes); a
    source without one is sized from the evaluated records alone.
    """
    from src.data.dataset import answer_budget, answer_labels, longest_answer_tokens

    labels = [[box.label for box in record.boxes] for record in records]
    try:
        labels += answer_labels(dataset, "train", image_root, val_fraction)
    except DatasetError:
        pass  # no train split to read: the evaluated images' own answers size the budget
    longest = longest_answer_tokens(labels, processor.tokenizer, family)
    return answer_budget(longest), longest


def image_intervals(predictions: list[Prediction]) -> dict:
    """95% bootstrap intervals of every headline metric over these images (src/scoring/bootstrap.py)."""
    from src.scoring.bootstrap import ImageScores, intervals

    samples = [(p.boxes, p.truths, p.parsed, p.crowd) for p in predictions]
    return intervals([ImageScores.from_samples(samples)]) if samples else {}


def class_agnostic_metrics(samples: list, iou_threshold: float = 0.5) -> dict:
    """Precision, recall, F1 and mean IoU with boxes matched whatever their labels."""
    from src.scoring.metrics import match_boxes, sample_parts

    tp = n_preds = n_truths = 0
    ious: list[float] = []
    for sample in samples:
        preds, truths, _, crowd = sample_parts(sample)
        matching = match_boxes(preds, truths, iou_threshold, class_agnostic=True, crowd=crowd)
        tp += len(matching.pairs)
        ious += [overlap for _, _, overlap in matching.pairs]
        n_preds, n_truths = n_preds + matching.counted_preds(len(preds)), n_truths + len(truths)
    precision = tp / n_preds if n_preds else 0.0
    recall = tp / n_truths if n_truths else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_iou": sum(ious) / len(ious) if ious else 0.0,
    }


def _box_json(box: Box) -> dict:
    return {k: v for k, v in asdict(box).items() if v is not None}


def write_predictions(path: Path, predictions: list[Prediction]) -> Path:
    """predictions.jsonl, written to a temporary name and renamed, like metrics.json."""
    lines = [
        {
            "image": p.image,
            "width": p.width,
            "height": p.height,
            "truths": [_box_json(b) for b in p.truths],
            **({"crowd": [_box_json(b) for b in p.crowd]} if p.crowd else {}),
            "predictions": [_box_json(b) for b in p.boxes],
            "text": p.text,
            "parsed": p.parsed,
            "malformed": p.malformed,
        }
        for p in predictions
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.eval.evaluate", description=__doc__.splitlines()[0])
    arg = parser.add_argument
    arg(
        "output_dirs",
        nargs="+",
        metavar="OUTPUT_DIR",
        help="worker output directories, evaluated in turn in this one process (with --base: one, "
        "where to write)",
    )
    arg(
        "--dataset",
        default="fixtures/data",
        help="imagefolder dir, COCO .json or hub name (default: %(default)s)",
    )
    arg("--split", default="test", choices=SPLITS, help="split to evaluate on (default: %(default)s)")
    BY_DEST["val_fraction"].add_to(parser)
    arg(
        "--max-samples",
        "--eval-samples",
        dest="max_samples",
        type=int,
        default=0,
        help="evaluate the first N images; 0 for the whole split (default: %(default)s)",
    )
    arg(
        "--batch-size",
        type=int_or_auto,
        default="auto",
        help="images per generate() call, or auto: from free GPU memory, 8 on the CPU (default: %(default)s)",
    )
    arg(
        "--max-new-tokens",
        type=int_or_auto,
        default="auto",
        help="answer length cap, or auto: the data's longest answer plus a margin (default: %(default)s)",
    )
    arg("--image-root", default=None, help="folder holding the data set's images, if not found beside it")
    arg("--no-sort", action="store_true", help="batch images in file order, not grouped by size")
    arg(
        "--decode",
        choices=DECODE_MODES,
        default="plain",
        help="plain: dynamic KV cache; static: static KV cache, the decoding step compiled on a GPU for"
        " each new batch shape (about 26 s at 7B): faster for long evaluations at one shape (256 images on"
        " an H100: 31.4 images/s against 18.0) (default: %(default)s)",
    )
    arg("--cpu", action="store_true", help="evaluate on the CPU even if a GPU is visible")
    arg("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    arg("--base", metavar="MODEL_ID", default=None, help="evaluate this model as it is (zero-shot baseline)")
    return parser


def _usage_problems(args) -> list[str]:
    problems = []
    if args.max_samples < 0:
        problems.append(f"--max-samples {args.max_samples}: use 0 (the whole split) or more")
    if args.batch_size != "auto" and args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size}: use auto or at least 1")
    if args.max_new_tokens != "auto" and args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens}: use at least 1")
    if args.base and len(args.output_dirs) > 1:
        problems.append("--base writes into one OUTPUT_DIR; got several")
    return problems


def evaluate_one(output_dir: str, base: str | None, options: dict) -> int:
    """Exit code for one directory; the summary line goes to stdout, problems to stderr."""
    try:
        if base:
            metrics = evaluate_base(base, out_dir=output_dir, **options)
        else:
            metrics = evaluate_output(output_dir, **options)
    except (EvaluationError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return exits.USAGE
    except Exception:  # a failed evaluation is reported with its traceback, never silent
        log.exception("evaluation of %s failed", output_dir)
        return exits.FAILED
    summary = {k: round(metrics[k], 3) for k in ("precision", "recall", "f1", "map_50", "parse_rate")}
    f1 = metrics.get("intervals", {}).get("f1")
    band = f" (F1 95% CI [{f1['low']:.3f}, {f1['high']:.3f}])" if f1 else ""
    speed = metrics["eval"].get("images_per_s")
    rate = f", {metrics['num_images']} images at {speed:.2f} images/s" if speed else ""
    if metrics.get("truncated"):
        budget = metrics["eval"]["max_new_tokens"]
        rate += f", {metrics['truncated']} answer(s) cut off at max_new_tokens {budget}"
    print(f"{output_dir}: {json.dumps(summary)}{band}{rate} -> {Path(output_dir) / METRICS_FILE}", flush=True)
    return exits.OK


def main(argv: list[str] | None = None) -> int:
    """Evaluate each OUTPUT_DIR; the exit code is the worst of theirs (2 bad input, 1 failed)."""
    args = build_parser().parse_args(argv)
    if problems := _usage_problems(args):
        print("error: " + "\nerror: ".join(problems), file=sys.stderr)
        return exits.USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from src.utils.gpu import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    options = {
        "dataset": args.dataset,
        "split": args.split,
        "val_fraction": args.val_fraction,
        "max_samples": args.max_samples or None,
        "device": resolve_device(args.cpu),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "image_root": args.image_root,
        "sort_by_size": not args.no_sort,
        "decode": args.decode,
        "progress_stage": None,  # a person reads this output: log lines, not RR_PROGRESS events
    }
    codes = [evaluate_one(output_dir, args.base, options) for output_dir in args.output_dirs]
    return exits.worst(codes)


if __name__ == "__main__":
    raise SystemExit(main())
