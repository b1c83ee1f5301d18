"""Before anything starts: each recipe's predicted peak GPU memory and step time on the GPUs it is given,
and the setting `--batch-size auto` picks (the fastest that fits, by the planner's cost model). Pure
planning over `src/planner.py` (no torch): the model's config.json, the data set's largest image, the
batch, gradient checkpointing.

Measured against the benchmark on an H200 the prediction was within 6% for every recipe at the
2B and 7B shapes (docs/benchmarks.md). Hub models are planned when their config.json is in the
local Hugging Face cache; hub data sets are not read here (their image sizes need a download).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from src.planner import (
    HEADROOM,
    ModelShape,
    choose_checkpointing,
    estimate_recipe_memory,
    image_grid,
    pixel_limits,
    processor_pixel_limits,
)
from src.step_time import predict_step_seconds, rank_settings

TEXT_TOKENS = 128  # prompt + answer of a detection sample; 88 in the synthetic data, more with many boxes
AUTO_EFFECTIVE_BATCH = 16  # samples per optimizer step that --batch-size auto keeps


@dataclass(frozen=True)
class Workload:
    """What one sample costs the planner: its image patches and text tokens."""

    patches: int
    text_tokens: int = TEXT_TOKENS
    records: int = 0  # training samples, for the number of steps an epoch takes


@dataclass(frozen=True)
class MemoryPlan:
    recipe: str
    batch_size: int
    grad_accum: int
    checkpointing: bool
    predicted_gib: float
    capacity_gib: float
    predicted_step_s: float = 0.0  # one optimizer step, by the planner's cost model
    train_s: float = 0.0  # every step of every stage (set by the launcher, which knows the steps)
    why: str = ""  # how the setting was chosen, for `plan`
    compiled: bool = False  # the worker will torch.compile (src.step_time.compile_chosen)
    offloaded: bool = False  # recompute's block inputs wait in host memory (--offload-activations)

    @property
    def fits(self) -> bool:
        return self.predicted_gib <= self.capacity_gib

    def describe(self) -> str:
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (
            f"predicted peak {self.predicted_gib:.1f} GiB of {self.capacity_gib:.1f} GiB: {verdict} "
            f"(micro-batch {self.batch_size} x accumulation {self.grad_accum}, "
            f"gradient checkpointing {'on' if self.checkpointing else 'off'}"
            f"{', compiled' if self.compiled else ''}{', offloaded' if self.offloaded else ''}); "
            f"about {self.predicted_step_s:.2f} s a step{self.why}"
        )


PLANNER_FILES = ("config.json", "preprocessor_config.json")  # all the planner reads of a model


def model_dir_for(model_id: str, fetch: bool = False) -> Path | None:
    """A directory holding the model's config.json: the local path, or the hub cache's snapshot; with
    `fetch`, a hub model's PLANNER_FILES are downloaded into that cache when missing (never the weights).
    """
    path = Path(model_id)
    if (path / "config.json").is_file():
        return path
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    if not fetch or path.exists() or model_id.startswith((".", "/")):
        return None
    try:
        found = [hf_hub_download(model_id, name) for name in PLANNER_FILES[:1]]
        with contextlib.suppress(Exception):  # a model without a processor config plans with Qwen's limits
            hf_hub_download(model_id, PLANNER_FILES[1])
    except Exception:  # offline, unknown id, gated: the caller says what to do
        return None
    return Path(found[0]).parent


# What a worker loads of a hub model: weights, configs, tokenizer and chat template (no duplicate .bin).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


class ModelUnavailable(RuntimeError):
    """A hub model that is neither in the local cache nor downloadable now."""


def local_model(model_id: str) -> str:
    """A local directory for `model_id`: the path itself, or the hub snapshot, downloaded once here (with
    the hub's own progress) so that every worker loads the same files and none downloads its own.

    Offline (HF_HUB_OFFLINE=1, or no network) a cached snapshot is used; ModelUnavailable otherwise.
    """
    if Path(model_id).is_dir() or model_id.startswith((".", "/")):
        return model_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, allow_patterns=MODEL_FILES)
    except Exception as online_error:  # offline, unknown id, gated, no space: try the cache alone
        try:
            return snapshot_download(model_id, allow_patterns=MODEL_FILES, local_files_only=True)
        except Exception:
            raise ModelUnavailable(f"{type(online_error).__name__}: {online_error}") from None


def workload_for(
    dataset: str,
    model_dir: Path,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    image_root: str | None = None,
) -> Workload | None:
    """The largest image of a local data set, in patches, resized as the run will (src.planner.pixel_limits:
    the flags, else the model processor's limits with training's cap)."""
    from src.data.dataset import DatasetError, load_records

    if not Path(dataset).exists():
        return None
    try:
        records, _ = load_records(dataset, "train", skip_bad=True, image_root=image_root)
    except DatasetError:
        return None
    low, high = pixel_limits(processor_pixel_limits(model_dir), min_pixels, max_pixels)
    patches = max((image_grid(r.width, r.height, low, high)[0] for r in records), default=0)
    return Workload(patches, records=len(records)) if patches else None


def plan_memory(
    recipe,
    shape: ModelShape,
    workload: Workload,
    capacity_mib: int,
    batch_size: int | str,
    grad_accum: int,
    checkpointing: str,
    samples_per_step: int = AUTO_EFFECTIVE_BATCH,
    compiled: bool = False,
    offloaded: bool = False,
) -> MemoryPlan | None:
    """The plan for one recipe (one rank of it) on a GPU of `capacity_mib`; None when --batch-size auto
    finds no fit.

    `checkpointing` is the flag: "on", "off", or "auto" (off when the activations fit, as the
    worker decides). `batch_size` "auto" picks, of every micro-batch x accumulation x recompute setting
    of `samples_per_step`, the one the planner's cost model predicts fastest among those that fit.
    `compiled`: whether the worker will compile, which the step times count. `offloaded`: the worker
    offloads what recompute keeps, which memory and step times count.
    """
    if offloaded:  # recompute is implied, as the worker decides (src.training.run.resolve_checkpointing)
        checkpointing = "on"
    capacity = capacity_mib * 2**20
    sizes = (shape, recipe)
    work = (workload.patches, workload.text_tokens)
    if batch_size == "auto":
        choices = {"on": (True,), "off": (False,)}.get(checkpointing, (False, True))
        ranked = rank_settings(
            *sizes,
            samples_per_step,
            capacity,
            *work,
            headroom=HEADROOM,
            checkpointing_choices=choices,
            compile_choices=(compiled,),
            offloaded=offloaded,
        )
        best = ranked[0]
        if not best.fits:
            return None
        others = [c for c in ranked[1:3] if c.fits]
        why = "; fastest that fits, before " + ", ".join(c.describe() for c in others) if others else ""
        setting = (best.micro_batch, best.grad_accum, best.checkpointing)
        return _plan(recipe, shape, workload, capacity_mib, *setting, compiled, offloaded, why)
    if checkpointing == "auto":
        ckpt = choose_checkpointing(*sizes, batch_size, capacity, *work, HEADROOM, compiled=compiled)
    else:
        ckpt = checkpointing == "on"
    return _plan(recipe, shape, workload, capacity_mib, batch_size, grad_accum, ckpt, compiled, offloaded)


def _plan(
    recipe, shape, workload, capacity_mib, batch_size, grad_accum, checkpointing, compiled, offloaded, why=""
) -> MemoryPlan:
    work = (workload.patches, workload.text_tokens)
    how = {"compiled": compiled, "offloaded": offloaded}
    estimate = estimate_recipe_memory(shape, recipe, batch_size, *work, checkpointing, **how)
    seconds = predict_step_seconds(shape, recipe, batch_size, grad_accum, *work, checkpointing, **how)
    return MemoryPlan(
        recipe.name,
        batch_size,
        grad_accum,
        checkpointing,
        round(estimate.gib, 2),
        round(capacity_mib / 1024, 1),
        round(seconds, 3),
        why=why,
        compiled=compiled,
        offloaded=offloaded,
    )
