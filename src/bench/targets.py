"""What the benchmark runs on: a model (a published shape with random weights, built once, or a model
directory of your own) and its training data as the worker builds it, read once for every row.

The shapes' synthetic data (`--image-sizes`): `one`, every image 644x476 (the tiny shape: its fixtures'
112x112 images); `mixed`, COCO's frequent sizes in turn (src/fixtures/synthetic.py, COCO_SIZES), enough
images that the core's size-grouped sampler meets windows as long as on a large data set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SIZE = (644, 476)  # 391 image tokens a sample, as in the reference figures
IMAGE_SIZES = ("one", "mixed")  # --image-sizes: IMAGE_SIZE alone, or COCO_SIZES in turn
LISTED_SIZES = 8  # a row lists its data's most frequent image sizes, the rest counted together
SAMPLE_STATS_SAMPLES = 16
# Synthetic training images: enough that a row's warm-up, timed and profiled steps stay inside one epoch.
# Each new epoch restarts the data loader's prefetching, so its first micro-batch waits a whole collation
# (0.3-0.7 s for 8 images on a CPU core): with the 32 images of before, the core's rows at 16 samples a
# step paid that every other step, where a user's data set of thousands of images pays it rarely and the
# bare loop (batches built once) never does.
MIN_SYNTHETIC_IMAGES = 256
EPOCH_SLACK_STEPS = 1  # the step a row's last timing needs the loader for
PROFILED_STEPS = 2  # --profile's extra steps per profiled row


@dataclass
class Target:
    """One model and its data, with what every row of it shares (read once, not once a row)."""

    label: str
    model_dir: Path
    data_dir: Path
    dataset: object  # the training conversations, as the worker builds them
    processor: object
    stats: dict  # mean tokens, patches and labels a sample (sample_stats)
    memory_shape: object  # src.planning.parameters.ModelShape
    flop_shape: object  # src.bench.measure.FlopShape
    largest: tuple[int, int]  # (image patches, text tokens) of the largest sample: what the worker plans for
    patch_keys: list[int]  # each sample's vision patches, in file order (what the core groups sizes by)
    image_sizes: dict[str, int]  # "WxH" -> images, most frequent first (LISTED_SIZES of them, then "other")

    @classmethod
    def load(cls, label: str, model_dir: Path, data_dir: Path) -> Target:
        from src.bench.measure import FlopShape
        from src.data.dataset import build_dataset
        from src.models.loader import load_processor, model_family
        from src.planning.parameters import ModelShape
        from src.training.memory import image_patches, largest_sample, sample_image_sizes

        processor = load_processor(str(model_dir))
        dataset, _ = build_dataset(str(data_dir), "train", model_family(str(model_dir)), processor)
        stats = sample_stats(dataset, processor)
        shapes = ModelShape.from_model_dir(model_dir), FlopShape.from_model_dir(model_dir)
        largest = largest_sample(dataset, processor)
        sizes = sample_image_sizes(dataset)  # every file's header read once, for both
        keys, counts = image_patches(dataset, processor, sizes), image_size_counts(sizes)
        return cls(label, model_dir, data_dir, dataset, processor, stats, *shapes, largest, keys, counts)


def targets(args, device: str):
    """A Target for each model asked, building the shapes' models and data where missing."""
    work = Path(args.work)
    mixed = getattr(args, "image_sizes", "one") == "mixed"
    if args.model_id:
        data = Path(args.dataset or _synthetic_data(work, synthetic_images(args), mixed))
        yield Target.load(Path(args.model_id).name, Path(args.model_id), data)
    for shape in args.shape or []:
        if shape == "tiny":
            from src.fixtures.build import build_test_fixtures

            model_dir, fixture_data = build_test_fixtures(work / "tiny")
            data = _synthetic_data(work, synthetic_images(args), mixed) if mixed else fixture_data
            yield Target.load("tiny", model_dir, data)
            continue
        from src.fixtures.shapes import build_shape_model

        model_dir = work / shape
        if not (model_dir / "config.json").is_file():
            build_shape_model(shape, model_dir, device=device)
        yield Target.load(shape, model_dir, _synthetic_data(work, synthetic_images(args), mixed))


def synthetic_images(args) -> int:
    """Training images for the synthetic data: one epoch covers every step a row trains. Of mixed sizes,
    at least four of the size-grouped sampler's longest windows (as a large data set of COCO's has): with
    fewer, its windows shrink and fewer of its micro-batches are of one size than on real data."""
    from src.training.size_groups import WINDOW_STEPS

    steps = args.warmup + args.steps + PROFILED_STEPS + EPOCH_SLACK_STEPS
    images = max(MIN_SYNTHETIC_IMAGES, args.samples_per_step * steps)
    if getattr(args, "image_sizes", "one") == "mixed":
        images = max(images, 4 * WINDOW_STEPS * args.samples_per_step)
    return images


def _synthetic_data(work: Path, images: int, mixed: bool = False) -> Path:
    """The shapes data set of `images` training images of one size or of COCO's sizes, written once: kept
    while its synthetic.json says it holds what is asked."""
    import json
    import shutil

    from src.fixtures.synthetic import COCO_SIZES, SETTINGS_FILE, dataset_settings, write_dataset

    sizes = COCO_SIZES if mixed else None
    data = work / (f"data-coco-sizes-{images}" if mixed else f"data-644x476-{images}")
    wanted = dataset_settings(images, 1, "source", 0, IMAGE_SIZE, 2, (0.2, 0.45), sizes)
    settings = data / SETTINGS_FILE
    if not settings.is_file() or json.loads(settings.read_text()) != wanted:
        shutil.rmtree(data, ignore_errors=True)
        write_dataset(data, train=images, test=1, size=IMAGE_SIZE, sizes=sizes)
    return data


def image_size_counts(sizes: list[list[tuple[int, int]]], listed: int = LISTED_SIZES) -> dict[str, int]:
    """{"WxH": images} of the samples' image sizes, most frequent first: `listed` sizes, the rest as
    "other"."""
    from collections import Counter

    counts = Counter(f"{width}x{height}" for sample in sizes for width, height in sample)
    ranked = counts.most_common()
    kept = dict(ranked[:listed])
    if rest := sum(count for _, count in ranked[listed:]):
        kept["other"] = rest
    return kept


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


def uniform_pct(keys: list[int], rows: list[int] | None, micro_batch: int) -> float | None:
    """The share of micro-batches (`rows` cut as the trainer cuts them) whose images are of one size."""
    from src.training.size_groups import uniform_micro_batches

    uniform, total = uniform_micro_batches(keys, rows or [], micro_batch)
    return round(100 * uniform / total, 1) if total else None


def timed_stats(target: Target, rows: list[int] | None) -> dict:
    """Mean tokens, image patches and label tokens a sample of the timed steps: the data's mean text and
    labels (sample_stats), with the image patches of the samples those steps took."""
    if not rows:
        return target.stats
    patches = sum(target.patch_keys[i] for i in rows) / len(rows)
    text = target.stats["tokens"] - target.stats["patches"] / 4  # an LLM token covers 2x2 patches
    return {**target.stats, "patches": patches, "tokens": text + patches / 4}
