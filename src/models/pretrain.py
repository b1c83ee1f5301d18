"""Pretrain the tiny Qwen2-VL from scratch into a shape detector, so the demo's comparison means something.

A recipe comparison on random weights says nothing: every recipe "wins" or "loses" by noise. The
offline demo therefore starts from a base that already detects plain coloured shapes (the synthetic
"source" domain) and fine-tunes each recipe on the shifted "target" domain (the same shapes in colours
the source never shows, on noisy checkered backgrounds), where that base fails zero-shot: it finds
most objects but names them in source colours.

    python -m src.models.pretrain                        # fixtures/{source-data,data,tiny-qwen2-vl}
    python -m src.models.pretrain --root DIR --steps 1500 --seed 0 --threads 2 --force

From Python (what the fixtures step calls):

    from src.models.pretrain import build_detector_fixtures
    model_dir, target_dir, source_dir = build_detector_fixtures(Path("fixtures"))

Full training of every weight (not LoRA) in a plain torch loop: AdamW, linear warmup then cosine
decay, gradient clipping, loss on the assistant's answer only (the collator the recipes use).
Deterministic for a given seed on a given machine and thread count. On 2 CPU cores the default 1500
steps take under 4 minutes; the result is cached and rebuilt only when its settings change.
`pretraining.json` beside the weights records the settings, time, loss curve and the detector's
scores on the source test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("recipe-pretrain")

PRETRAIN_STEPS = 1500
PRETRAIN_BATCH = 16
PRETRAIN_LR = 1e-3
IMAGE_SIZE = (140, 140)  # 5 x 5 = 25 image tokens for the LLM
OBJECTS_PER_IMAGE = 1
OBJECT_SIDE = (0.3, 0.6)  # of the image side: large objects make IoU >= 0.5 reachable for a tiny model
SOURCE_SPLITS = {"train": 2000, "test": 32}  # pretraining pool; its test split checks the detector
TARGET_SPLITS = {"train": 256, "test": 32}  # what the recipes fine-tune and are evaluated on
SOURCE_DIR, TARGET_DIR, INIT_DIR, MODEL_DIR = "source-data", "data", "tiny-qwen2-vl-init", "tiny-qwen2-vl"
SUMMARY_FILE = "pretraining.json"
SOURCE_CHECK_SAMPLES = 32


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _records(data_dir: str | Path, split: str) -> list:
    """Validated records with their images decoded once and kept in memory."""
    from src.data.collators import load_image
    from src.data.dataset import load_records

    records, _ = load_records(str(data_dir), split)
    for record in records:
        record.image = load_image(str(record.image))
    return records


def pretrain_tiny_detector(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    steps: int = PRETRAIN_STEPS,
    batch_size: int = PRETRAIN_BATCH,
    learning_rate: float = PRETRAIN_LR,
    seed: int = 0,
    log_every: int = 50,
) -> Path:
    """Train every weight of the model in `model_dir` on `data_dir`'s train split; save to `out_dir`.

    Returns `out_dir`, which then holds the model, its processor and `pretraining.json` (settings,
    seconds, loss every `log_every` steps, and scores on `data_dir`'s test split when it has one).
    Runs on the CPU with torch's current thread setting.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from src.data.collators import AssistantOnlyCollator
    from src.data.dataset import convert_to_conversation_format
    from src.models.loader import load_processor

    torch.manual_seed(seed)
    processor = load_processor(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    conversations = [convert_to_conversation_format(r) for r in _records(data_dir, "train")]
    collate = AssistantOnlyCollator(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    order = torch.Generator().manual_seed(seed)

    history, smoothed, started = [], None, time.time()
    model.train()
    for step in range(steps):
        picks = torch.randint(len(conversations), (batch_size,), generator=order).tolist()
        loss = model(**collate([conversations[i] for i in picks])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "smoothed": round(smoothed, 4)})
            log.info(
                "pretrain step %d/%d loss %.4f (%.0f s)", step + 1, steps, smoothed, time.time() - started
            )
    seconds = time.time() - started

    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {
        "what": "tiny Qwen2-VL pretrained from scratch (full training) on synthetic shapes",
        "init": str(model_dir),
        "data": str(data_dir),
        "train_images": len(conversations),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
        "final_loss": round(smoothed, 4) if smoothed is not None else None,
        "history": history,
        "source_test": _check_detector(model.eval(), processor, data_dir),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return out


def _check_detector(model, processor, data_dir: str | Path) -> dict | None:
    """Scores on the first test images of the pretraining domain (None without a test split)."""
    from src.data.dataset import DatasetError
    from src.eval.evaluate import class_agnostic_metrics
    from src.eval.metrics import detection_metrics
    from src.eval.predict import predict_records

    try:
        records = _records(data_dir, "test")[:SOURCE_CHECK_SAMPLES]
    except DatasetError:
        return None
    predictions = predict_records(model, processor, records, batch_size=16, max_new_tokens=48)
    samples = [(p.boxes, p.truths, p.parsed) for p in predictions]
    scores = detection_metrics(samples)
    keep = ("num_images", "precision", "recall", "f1", "mean_iou", "map_50", "parse_rate")
    result = {key: scores[key] for key in keep} | {"class_agnostic": class_agnostic_metrics(samples)}
    log.info("pretrained detector on %s test: %s", data_dir, {k: result[k] for k in ("precision", "recall")})
    return result


def _holds(path: Path, settings_file: str, wanted: dict) -> bool:
    """True when `path` was built with exactly `wanted` (its settings file says so)."""
    try:
        recorded = json.loads((path / settings_file).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return all(recorded.get(key) == value for key, value in wanted.items())


def build_detector_fixtures(
    root: str | Path, force: bool = False, steps: int = PRETRAIN_STEPS, seed: int = 0
) -> tuple[Path, Path, Path]:
    """(pretrained model dir, target data dir, source data dir) under root.

    Each is kept when it was already built with the same settings, else (re)built: the source and
    target data sets, then the tiny detector initialised at random and pretrained on the source.
    """
    from src.data.synthetic import SETTINGS_FILE, dataset_settings, write_dataset
    from src.models.tiny import DETECTOR_SIZE, build_tiny_model

    root = Path(root)
    source, target = root / SOURCE_DIR, root / TARGET_DIR
    init, model = root / INIT_DIR, root / MODEL_DIR
    retrain = force
    data_sets = ((source, "source", SOURCE_SPLITS, seed), (target, "target", TARGET_SPLITS, seed + 100))
    for path, domain, splits, data_seed in data_sets:
        args = (
            splits["train"],
            splits["test"],
            domain,
            data_seed,
            IMAGE_SIZE,
            OBJECTS_PER_IMAGE,
            OBJECT_SIDE,
        )
        if force or not _holds(path, SETTINGS_FILE, dataset_settings(*args)):
            shutil.rmtree(path, ignore_errors=True)
            write_dataset(path, *args)
            retrain = retrain or domain == "source"  # a new pretraining set means a new detector
    wanted = {"steps": steps, "seed": seed, "train_images": SOURCE_SPLITS["train"], "size": DETECTOR_SIZE}
    if retrain or not _holds(model, SUMMARY_FILE, json.loads(json.dumps(wanted))):
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(init, ignore_errors=True)
        build_tiny_model(init, seed=seed, **DETECTOR_SIZE)
        pretrain_tiny_detector(init, source, model, steps=steps, seed=seed)
        _record_size(model, DETECTOR_SIZE)
        shutil.rmtree(init, ignore_errors=True)
    return model, target, source


def _record_size(model: Path, size: dict) -> None:
    summary = json.loads((model / SUMMARY_FILE).read_text())
    summary["size"] = json.loads(json.dumps(size))
    (model / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.models.pretrain", description=__doc__.splitlines()[0]
    )
    arg = parser.add_argument
    arg("--root", default="fixtures", help="fixtures directory (default: %(default)s)")
    arg("--steps", type=int, default=PRETRAIN_STEPS, help="optimizer steps (default: %(default)s)")
    arg("--seed", type=int, default=0, help="seed for data, init and batch order (default: %(default)s)")
    arg("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    arg("--force", action="store_true", help="rebuild even if the fixtures exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, target, source = build_detector_fixtures(Path(args.root), args.force, args.steps, args.seed)
    print(f"model:       {model}\ntarget data: {target}\nsource data: {source}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
