"""Before anything starts: each recipe's predicted peak GPU memory and step time on the GPUs it is given,
and the setting `--batch-size auto` picks (the fastest that fits, by the planner's cost model). Pure
planning over `src/planning/memory.py` (no torch): the model's config.json, the data set's largest image, the
batch, gradient checkpointing.

Measured against the benchmark on an H200 the prediction was within 6% for every recipe at the
2B and 7B shapes (docs/benchmarks.md). Hub models are planned when their config.json is in the
local Hugging Face cache; hub data sets are not read here (their image sizes need a download).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from recipe_runner.host.models import model_dir_for
from recipe_runner.planning.request import LaunchRequest, PlanError
from src.contract.flags import AUTO_EFFECTIVE_BATCH, BY_DEST, DEFAULT_DATASET, DEFAULT_MODEL, TrainFlags
from src.planning.evaluation import eval_peak_bytes
from src.planning.memory import (
    HEADROOM,
    choose_checkpointing,
    choose_dequantized,
    dequantized_copy_bytes,
    estimate_recipe_memory,
    recompute_asked,
)
from src.planning.parameters import ModelShape
from src.planning.pixels import image_grid, limits_from_config, patch_geometry, pixel_limits
from src.planning.step_time import COMPILE_S, compile_chosen, predict_step_seconds, rank_settings, stage_steps

TEXT_TOKENS = 128  # prompt + answer of a detection sample; 88 in the synthetic data, more with many boxes


@dataclass(frozen=True)
class Workload:
    """What one sample costs the planner: its image patches and text tokens."""

    patches: int
    text_tokens: int = TEXT_TOKENS
    records: int = 0  # training samples, for the number of steps an epoch takes


@dataclass(frozen=True)
class MemoryEstimate:
    recipe: str
    batch_size: int
    grad_accum: int
    checkpointing: bool
    predicted_gib: float
    capacity_gib: float
    predicted_step_s: float = 0.0  # one optimizer step, by the planner's cost model
    train_s: float = 0.0  # every step of every stage (set by the launcher, which knows the steps)
    why: str = ""  # how the setting was chosen, for `plan`
    compiled: bool = False  # the worker will torch.compile (src.planning.step_time.compile_chosen)
    offloaded: bool = False  # recompute's block inputs wait in host memory (--offload-activations)
    dequantized: bool = False  # a 4-bit recipe keeps bf16 copies of its weights (counted in predicted_gib)
    share: int = 1  # planned to fit 1/share of the GPU, so that jobs run side by side (estimate_settings)
    eval_gib: float = 0.0  # evaluation after training: the bf16 model and one image (0: --skip-eval)

    @property
    def fits(self) -> bool:
        return self.predicted_gib <= self.capacity_gib

    @property
    def reserved_gib(self) -> float:
        """What a packed job holds its GPU to: its training's peak, or its evaluation's where larger (a 4-bit
        recipe trained small evaluates on the bf16 model, in the same capped process)."""
        return max(self.predicted_gib, self.eval_gib)

    def describe(self) -> str:
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (
            f"predicted peak {self.predicted_gib:.1f} GiB of {self.capacity_gib:.1f} GiB: {verdict} "
            f"(micro-batch {self.batch_size} x accumulation {self.grad_accum}, "
            f"gradient checkpointing {'on' if self.checkpointing else 'off'}"
            f"{', compiled' if self.compiled else ''}{', offloaded' if self.offloaded else ''}"
            f"{', 4-bit weights dequantized once' if self.dequantized else ''}); "
            f"about {self.predicted_step_s:.2f} s a step{self.why}"
        )


def workload_for(
    dataset: str,
    model_dir: Path,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    image_root: str | None = None,
) -> Workload | None:
    """The largest image of a local data set, in patches, resized as the run will (by the model's patch and
    merge sizes; src.planning.pixels.pixel_limits: the flags, else the model processor's limits with
    training's cap)."""
    from src.data.dataset import load_records
    from src.data.records import DatasetError

    if not Path(dataset).exists():
        return None
    try:
        records, _ = load_records(dataset, "train", skip_bad=True, image_root=image_root)
    except DatasetError:
        return None
    patch, merge = patch_geometry(model_dir)
    low, high = pixel_limits(limits_from_config(model_dir), min_pixels, max_pixels, patch * merge)
    patches = max((image_grid(r.width, r.height, low, high, patch, merge)[0] for r in records), default=0)
    return Workload(patches, records=len(records)) if patches else None


def estimate_memory(
    recipe,
    shape: ModelShape,
    workload: Workload,
    capacity_mib: int,
    batch_size: int | str,
    grad_accum: int,
    checkpointing: bool | None,
    samples_per_step: int = AUTO_EFFECTIVE_BATCH,
    compiled: bool = False,
    offloaded: bool = False,
    dequantize: bool | None = None,
) -> MemoryEstimate | None:
    """The plan for one recipe (one rank of it) on a GPU of `capacity_mib`; None when --batch-size auto
    finds no fit.

    `checkpointing`: True, False, or None for auto (off when the activations fit, as the worker
    decides). `batch_size` "auto" picks, of every micro-batch x accumulation x recompute setting of
    `samples_per_step`, the one the planner's cost model predicts fastest among those that fit.
    `compiled`: whether the worker will compile, which the step times count. `offloaded`: the worker
    offloads what recompute keeps, which memory and step times count. `dequantize`: whether a 4-bit recipe
    keeps bf16 copies of its weights (--dequantize-once on/off), or None to decide as the worker alone on
    the GPU would: when they fit. The plan's choice is passed to the worker (placement.place_job), so a
    packed job's reservation holds what it runs.
    """
    checkpointing = recompute_asked(checkpointing, offloaded)
    capacity = capacity_mib * 2**20
    sizes = (shape, recipe)
    work = (workload.patches, workload.text_tokens)
    if batch_size == "auto":
        choices = (False, True) if checkpointing is None else (checkpointing,)
        ranked = rank_settings(
            *sizes,
            samples_per_step,
            capacity,
            *work,
            headroom=HEADROOM,
            checkpointing_choices=choices,
            compile_choices=(compiled,),
            offloaded=offloaded,
            dequantize_choices=(True, False) if dequantize is None else (dequantize,),
        )
        best = ranked[0]
        if not best.fits:
            return None
        others = [c for c in ranked[1:3] if c.fits]
        why = "; fastest that fits, before " + ", ".join(c.describe() for c in others) if others else ""
        setting = (best.micro_batch, best.grad_accum, best.checkpointing)
        return _plan(
            recipe, shape, workload, capacity_mib, *setting, compiled, offloaded, best.dequantized, why
        )
    micro = int(batch_size)
    ckpt = checkpointing
    if ckpt is None:
        ckpt = choose_checkpointing(*sizes, micro, capacity, *work, HEADROOM, compiled=compiled)
    if dequantize is None:
        dequantize = choose_dequantized(*sizes, micro, capacity, *work, ckpt, HEADROOM, compiled=compiled)
    return _plan(
        recipe, shape, workload, capacity_mib, micro, grad_accum, ckpt, compiled, offloaded, dequantize
    )


def _plan(
    recipe,
    shape,
    workload,
    capacity_mib,
    batch_size,
    grad_accum,
    checkpointing,
    compiled,
    offloaded,
    dequantized,
    why="",
) -> MemoryEstimate:
    work = (workload.patches, workload.text_tokens)
    dequantized = dequantized and dequantized_copy_bytes(shape, recipe) > 0  # only a 4-bit recipe has copies
    how = {"compiled": compiled, "offloaded": offloaded, "dequantized": dequantized}
    estimate = estimate_recipe_memory(shape, recipe, batch_size, *work, checkpointing, **how)
    seconds = predict_step_seconds(shape, recipe, batch_size, grad_accum, *work, checkpointing, **how)
    return MemoryEstimate(
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
        dequantized=dequantized,
    )


def rank_batch(flags: TrainFlags, ranks: int) -> tuple[int | str, int]:
    """Each data-parallel rank's micro-batch and accumulation, keeping the samples of one optimizer step.

    The accumulation divides first (the micro-batch, and so the speed of each step, stays); "auto"
    passes through: the planner splits AUTO_EFFECTIVE_BATCH itself.
    """
    batch, accum = flags.effective("batch_size"), flags.effective("grad_accum")
    if ranks == 1 or batch == "auto":
        if batch == "auto" and AUTO_EFFECTIVE_BATCH % ranks:
            raise PlanError(
                f"--batch-size auto keeps {AUTO_EFFECTIVE_BATCH} samples a step: "
                f"--gpus-per-recipe {ranks} does not divide it",
                "use --gpus-per-recipe 2, 4, 8 or 16",
            )
        return batch, accum
    if accum % ranks == 0:
        return batch, accum // ranks
    if batch % ranks == 0:
        return batch // ranks, accum
    raise PlanError(
        f"--gpus-per-recipe {ranks}: the {batch} x {accum} samples of a step cannot be split evenly over "
        f"{ranks} data-parallel processes",
        f"choose --batch-size and --grad-accum whose product divides by {ranks}, or add --shard",
    )


def training_steps(flags: TrainFlags, records: int, samples_per_step: int) -> int:
    """Optimizer steps of one stage: --max-steps, else the epochs over `records` samples."""
    return stage_steps(flags.max_steps, flags.effective("epochs"), max(records, 1), samples_per_step)


def planner_inputs(request: LaunchRequest, fetch: bool = False):
    """(model shape, the largest sample's workload) for the memory planner, or None where they cannot be
    read: the only step of placement that reads files (the model's config.json, the data sets' images).

    `fetch` allows downloading a hub model's config.json and preprocessor_config.json (nothing else).
    """

    model_dir = model_dir_for(request.flags.model_id or DEFAULT_MODEL, fetch=fetch)
    datasets = dict.fromkeys(
        point.dataset or request.flags.dataset or DEFAULT_DATASET for point in request.sweep
    )
    flags = request.flags
    sizes = (flags.min_pixels, flags.max_pixels, flags.image_root)
    found = [workload_for(d, model_dir, *sizes) for d in datasets] if model_dir else []
    workloads = [w for w in found if w is not None]
    if model_dir is None or not workloads or len(workloads) < len(found):
        return None
    return ModelShape.from_model_dir(model_dir), max(workloads, key=lambda w: w.patches)


def estimate_recipe(request: LaunchRequest, recipe, inputs, capacity_mib: int) -> MemoryEstimate | None:
    """One rank's plan of `recipe` on a GPU of `capacity_mib`, with its predicted training seconds;
    None when --batch-size auto finds no setting that fits."""
    shape, workload = inputs
    flags, ranks = request.flags, request.gpus_per_recipe
    batch, accum = rank_batch(flags, ranks)
    checkpointing = BY_DEST["gradient_checkpointing"].option_value(flags.effective("gradient_checkpointing"))
    samples_per_step = AUTO_EFFECTIVE_BATCH if batch == "auto" else int(batch) * accum * ranks
    steps = training_steps(flags, workload.records, samples_per_step)
    compiled = compile_chosen(flags.compile, True, steps)  # as the worker on its GPU will decide
    per_rank = AUTO_EFFECTIVE_BATCH // ranks
    plan = estimate_memory(
        recipe,
        shape,
        workload,
        capacity_mib,
        batch,
        accum,
        checkpointing,
        per_rank,
        compiled=compiled,
        offloaded=flags.offload_activations,
        dequantize=BY_DEST["dequantize_once"].option_value(flags.effective("dequantize_once")),
    )
    if plan is None:
        return None
    per_stage = steps * plan.predicted_step_s + (COMPILE_S if compiled else 0.0)
    evaluation = 0.0 if flags.skip_eval else evaluation_gib(shape, workload)
    return replace(plan, train_s=round(per_stage * len(recipe.stages or (recipe,)), 1), eval_gib=evaluation)


def evaluation_gib(shape: ModelShape, workload: Workload) -> float:
    """Evaluation's least GPU memory for the largest sample: its prompt (image and text tokens) and an
    answer as long as its text (the worker caps answers near the data's longest)."""
    prompt = workload.patches // shape.merge_size**2 + workload.text_tokens
    return round(eval_peak_bytes(shape, prompt, workload.text_tokens) / 2**30, 2)


# With packing, each recipe is also planned as if it had this share of the GPU: the fastest setting in half,
# a third and a quarter of it (recompute, no bf16 copies, and with --batch-size auto smaller micro-batches;
# never against a flag the user set), for the makespan to weigh (recipe_runner/planning/makespan.py).
SHARES = (2, 3, 4)


def estimate_settings(request: LaunchRequest, capacity_mib: int) -> dict[str, list[MemoryEstimate]]:
    """recipe -> its plans, the fastest that fits a GPU of `capacity_mib` first, then (packing) the fastest
    that fit in each of SHARES of it, each smaller than the one before."""
    inputs = None if request.shard else planner_inputs(request)
    plans = estimate_recipes(request, capacity_mib, inputs)
    if request.pack != "auto" or not plans:
        return {recipe: [plan] for recipe, plan in plans.items()}
    settings = {}
    for name, best in plans.items():
        found = [best]
        for share in SHARES:
            plan = estimate_recipe(request, request.recipe(name), inputs, capacity_mib // share)
            if plan is not None and plan.fits and plan.reserved_gib < found[-1].reserved_gib:
                why = f"; the fastest in 1/{share} of the GPU, so that jobs run side by side"
                found.append(replace(plan, capacity_gib=best.capacity_gib, share=share, why=why))
        settings[name] = found
    return settings


def estimate_recipes(request: LaunchRequest, capacity_mib: int, inputs=None) -> dict[str, MemoryEstimate]:
    """recipe -> the memory planner's plan of one rank on a GPU of `capacity_mib` (the pool's smallest).

    Empty where nothing can be planned (no local config.json or data set, --shard); with --batch-size
    auto such a launch is refused, since the worker needs a number. `inputs`: planner_inputs, when read.
    """
    auto = request.flags.batch_size == "auto"
    if inputs is None and not request.shard:
        inputs = planner_inputs(request)
    if inputs is None:
        if auto:
            raise PlanError(
                "--batch-size auto: cannot plan memory without the model's config.json on this machine "
                "and a local data set",
                "give --batch-size N instead",
            )
        return {}
    plans = {}
    for recipe in (request.recipe(name) for name in request.recipes):
        plan = estimate_recipe(request, recipe, inputs, capacity_mib)
        if plan is None:
            raise PlanError(
                f"--batch-size auto: {recipe.name} does not fit a {capacity_mib / 1024:.0f} GiB GPU even at "
                "micro-batch 1 with gradient checkpointing",
                "use a smaller model, or --gpus-per-recipe 2 --shard",
            )
        plans[recipe.name] = plan
    return plans
