"""Train one recipe: each stage reads top to bottom (load, wrap, freeze, train, save); r3 chains two.

Called by the worker (`src/training/worker.py`); usable from Python:

    from src.recipes import resolve_recipe
    from src.training.options import RunOptions
    from src.training.run import run_recipe
    run_recipe(resolve_recipe("r1"), RunOptions(model_id=..., dataset=..., output_dir=..., device="cpu"))

Under data parallelism (`python -m src.training.distributed`) every rank runs this same code: the
trainer splits each batch over the ranks; only rank 0 writes loss_history.jsonl and the outputs, and
the others wait at a barrier until it has (r3's stage 2 loads what stage 1 saved).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from src.contract import progress
from src.contract.env import FAULT_ENV, FAULT_RANK_ENV
from src.training import levers
from src.training.config import StageSettings, create_training_config
from src.training.options import RunOptions
from src.utils.files import atomic_dir
from src.utils.gpu import is_main_process, rank, world_size

log = logging.getLogger(__name__)
STAGE_MARKER = "recipe_stage.json"  # written beside a merged stage-1 model, checked by --checkpoint


@dataclass
class StageResult:
    name: str
    output: Path
    final_loss: float | None
    steps: int
    trainable: dict = field(default_factory=dict)
    skipped_records: int = 0
    peak_gpu_mem_gib: float | None = None  # torch's peak allocation (what the memory planner predicts)
    peak_gpu_reserved_gib: float | None = None  # what the caching allocator held at most (what a cap bounds)
    train_seconds: float | None = None
    samples_per_step: int | None = None  # per optimizer step, over all data-parallel ranks
    paused: bool = False  # stopped at --pause-at, checkpointed; not finished
    val_loss: float | None = None  # mean loss on the validation split (a search's tie-break)
    # (model, processor, family) as trained, where RunOptions.keep_trained asked for it (ready_for_generation)
    trained: tuple | None = field(default=None, repr=False, compare=False)


class ProgressCallback:
    """Turns the trainer's log events into RR_PROGRESS lines and loss_history.jsonl rows; steps between
    two logs get a progress line without the loss."""

    def __init__(self, recipe: str, stage: str, history: Path):
        self.recipe, self.stage, self.history = recipe, stage, history
        self.final_loss: float | None = None

    def as_trainer_callback(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= state.max_steps:  # the final loss, whatever the interval
                    control.should_log = True
                if control.should_log:
                    return  # on_log reports the step, with its loss
                if state.is_world_process_zero:
                    outer.step_done(state.global_step, state.max_steps)
                inject_fault(outer.stage, state.global_step)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if not logs or "loss" not in logs:
                    return
                if state.is_world_process_zero:  # the loss is already averaged over the ranks
                    outer.record(state.global_step, state.max_steps, logs)
                inject_fault(outer.stage, state.global_step)

        return _Callback()

    def step_done(self, step: int, total: int, **logged) -> None:
        """A step's progress line; `logged` adds what a logged step read back (loss, lr, ...). Without it
        nothing is read from the GPU."""
        progress.emit(
            "step",
            recipe=self.recipe,
            stage=self.stage,
            step=step,
            total=total,
            gpu_mem_gib=_gpu_memory_gib(),
            **logged,
        )

    def record(self, step: int, total: int, logs: dict) -> None:
        loss = float(logs["loss"])
        self.final_loss = loss
        logged = {
            "time": round(time.time(), 3),
            "loss": loss,
            "lr": logs.get("learning_rate"),
            "epoch": logs.get("epoch"),
        }
        with self.history.open("a") as handle:
            handle.write(json.dumps({"stage": self.stage, "step": step, **logged}) + "\n")
        self.step_done(step, total, **logged)
        log.info("[%s] step %d/%d loss %.4f", self.stage, step, total, loss)


def inject_fault(stage: str, step: int) -> None:
    """Fail here if the FAULT_ENV testing hook names this stage and step (and FAULT_RANK_ENV this rank)."""
    wanted = os.environ.get(FAULT_ENV, "").split(":")
    if wanted[:2] != [stage, str(step)]:
        return
    if os.environ.get(FAULT_RANK_ENV, str(rank())) != str(rank()):
        return
    if wanted[2:] == ["kill"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if wanted[2:] == ["oom"]:
        import torch

        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory (injected at {stage} step {step}, {FAULT_ENV})"
        )
    raise RuntimeError(f"injected fault at {stage} step {step} ({FAULT_ENV})")


def _gpu_memory_gib(reserved: bool = False) -> float | None:
    """Peak memory allocated (`reserved`: held by the caching allocator) on the fullest GPU this process
    uses (a sharded model spreads over several).

    A data-parallel rank asks about its own GPU only: asking about the others would open a CUDA
    context on each of them.
    """
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    devices = [torch.cuda.current_device()] if world_size() > 1 else range(torch.cuda.device_count())
    measure = torch.cuda.max_memory_reserved if reserved else torch.cuda.max_memory_allocated
    peak = max(measure(i) for i in devices)
    return round(peak / 2**30, 2)


def wait_for_every_rank() -> None:
    """Block until every data-parallel rank gets here; a no-op in a single-process run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        import torch

        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def load_for_stage(stage, model_id: str, device: str):
    """The base model as the stage wants it: 4-bit LLM for QLoRA stages, full precision otherwise."""
    from src.models.loader import load_model, load_quantized_model

    return load_quantized_model(model_id, device) if stage.quantized else load_model(model_id, device)


@dataclass
class PreparedStage:
    """A stage ready to train: the wrapped model, its processor and the trainer around them."""

    trainer: object
    model: object
    processor: object
    trainable: dict
    skipped_records: int
    reporter: ProgressCallback
    family: str = "qwen2_vl"
    # size_groups.SizeGroupedSampler where the stage draws micro-batches of one image size, else None
    size_sampler: object | None = None


def load_wrapped_model(stage, model_id: str, device: str, family: str):
    """The base model as the stage loads it, wrapped with its scoped LoRA and frozen around it.

    Returns (model, trainable parameter counts per part). The benchmark's plain loop starts here too.
    """
    from peft import get_peft_model

    from src.models.freeze import apply_freeze_policy
    from src.models.lora import create_lora_config

    base = load_for_stage(stage, model_id, device)
    model = get_peft_model(base, create_lora_config(stage, family, base))  # the base: for "full" parts
    return model, apply_freeze_policy(model, stage)


def train_stage(
    recipe_name: str,
    stage,
    model_id: str,
    opts: RunOptions,
    stage_dir: Path,
    merge: bool = False,
    pause_at: int | None = None,
) -> StageResult:
    """One stage: load, wrap with scoped LoRA, freeze, train, save adapter (or merged model).

    `pause_at`: stop after that many of the stage's optimizer steps, checkpointed, its schedule still the
    whole stage's; only the adapter is saved (a chain merges a stage when it finishes)."""
    started = time.monotonic()
    pause = PauseCallback(pause_at) if pause_at is not None else None
    prepared = prepare_stage(
        recipe_name, stage, model_id, opts, stage_dir, callbacks=[pause] if pause else []
    )
    checkpoint = last_checkpoint(stage_dir / "trainer") if opts.resume else None
    if checkpoint:
        log.info("[%s] resuming from %s", stage.name, checkpoint)
    prepared.trainer.train(resume_from_checkpoint=checkpoint)
    paused = pause is not None and prepared.trainer.state.global_step < prepared.trainer.state.max_steps
    if paused:
        state = prepared.trainer.state
        log.info("[%s] paused at step %d of %d", stage.name, state.global_step, state.max_steps)
        merge = False
    val_loss = validation_loss(prepared, opts) if opts.validation_loss else None

    output = stage_output_dir(stage_dir, merge)
    if is_main_process():
        save_stage(prepared.model, prepared.processor, stage_dir, merge, recipe_name, stage.name)
    wait_for_every_rank()  # the next stage (or the caller) may read what rank 0 just wrote
    final_loss = prepared.reporter.final_loss
    final_loss = final_loss if final_loss is None or math.isfinite(final_loss) else None
    trained = None
    if opts.keep_trained and not merge and not stage.quantized:
        trained = (prepared.model, prepared.processor, prepared.family)
    progress.emit(
        "stage_end", recipe=recipe_name, stage=stage.name, final_loss=final_loss, output=str(output)
    )
    return StageResult(
        stage.name,
        output,
        final_loss,
        prepared.trainer.state.global_step,
        prepared.trainable,
        prepared.skipped_records,
        peak_gpu_mem_gib=_gpu_memory_gib(),
        peak_gpu_reserved_gib=_gpu_memory_gib(reserved=True),
        train_seconds=round(time.monotonic() - started, 3),
        samples_per_step=samples_per_step(prepared.trainer.args),
        paused=paused,
        val_loss=val_loss,
        trained=trained,
    )


class PauseCallback:
    """Ends training after `step` optimizer steps with a checkpoint there: a rung of the learning-rate
    search is a pause in one run (same schedule, same data order), not a shorter run."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Pause(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_save = True
                    control.should_training_stop = True

        return _Pause()


def validation_loss(prepared: PreparedStage, opts: RunOptions) -> float | None:
    """The mean loss of the trained model on the validation split (the search's tie-break), or None
    where the data set has none."""
    from src.data.dataset import build_dataset

    try:
        dataset, _ = build_dataset(
            opts.dataset,
            "validation",
            prepared.family,
            prepared.processor,
            opts.skip_bad_records,
            image_root=opts.image_root,
            val_fraction=opts.val_fraction,
        )
    except Exception as error:  # a validation split that cannot be read is reported, and the loss skipped
        log.warning("no validation loss: %s", error)
        return None
    loss = prepared.trainer.evaluate(eval_dataset=dataset).get("eval_loss")
    log.info("validation loss %.4f over %d images", loss, len(dataset))
    return float(loss) if loss is not None else None


def ready_for_generation(model):
    """A trained PEFT model as evaluation would load it from what was saved: the adapter merged into the
    base, its layers eager, in eval mode, and the training's gradients and cached blocks freed.

    Training's speed levers are undone where generation cannot use them: compiled regions would compile
    again for every new KV-cache shape, and adapters fed bf16 inputs without their cast expect autocast,
    which generation does not run under. Merging does what loading the adapter onto its base does
    (src/eval/predict.py load_for_eval), so the answers are the same.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from src.training.compile import uncompile_regions

    uncompile_regions(model)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = True
    model.zero_grad(set_to_none=True)
    merged = model.merge_and_unload()
    if getattr(merged, "is_gradient_checkpointing", False):
        merged.gradient_checkpointing_disable()
    merged.eval()
    free_memory()  # the trainer, its optimizer state and gradients
    return merged


def free_memory() -> None:
    """Free what a finished stage's objects still hold: collect reference cycles, then return the
    allocator's cached GPU blocks.

    A trained model can outlive its stage in a cycle (on GPUs accelerate wraps the model's forward in
    autocast as a method bound to the model itself), which only the cyclic collector frees. Until it runs,
    the next stage's model or evaluation's loads beside it, and a packed job capped at its reservation
    runs out of memory there (docs/benchmarks.md, thirteenth session: r2's evaluation).
    """
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def samples_per_step(args) -> int:
    """Samples in one optimizer step: micro-batch x accumulation x data-parallel ranks."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def prepare_stage(
    recipe_name: str, stage, model_id: str, opts: RunOptions, stage_dir: Path, callbacks=()
) -> PreparedStage:
    """Load, wrap with scoped LoRA, freeze, and build the trainer (the benchmark times this same path)."""
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer

    from src.data.collators import AssistantOnlyCollator
    from src.data.dataset import build_dataset
    from src.models.freeze import keep_frozen_vision_out_of_autograd
    from src.models.loader import load_processor, model_family
    from src.models.vision_attention import use_varlen_vision_attention
    from src.training.host_positions import RopePositions, language_backbone, vision_lengths_on_host
    from src.training.size_groups import size_sampler_for, sized_trainer

    set_seed(opts.seed)  # before LoRA init, so the same seed gives the same adapter
    processor = load_processor(model_id, opts.min_pixels, opts.max_pixels)
    family = model_family(model_id)
    dataset, skipped = build_dataset(
        opts.dataset,
        "train",
        family,
        processor,
        opts.skip_bad_records,
        image_root=opts.image_root,
        val_fraction=opts.val_fraction,  # a search's trial trains without its validation split
    )
    if skipped:
        log.warning("skipped %d bad record(s) of %s", skipped, opts.dataset)

    model, trainable = load_wrapped_model(stage, model_id, opts.device, family)
    log.info("[%s] trainable parameters by part: %s", stage.name, dict(trainable))
    if opts.frozen_vision_no_grad and keep_frozen_vision_out_of_autograd(model, stage):
        log.info("[%s] vision tower trains nothing: it runs without autograd", stage.name)
    if not opts.adapter_input_casts and opts.device == "cuda":  # the CPU trains without autocast
        skip_adapter_input_casts(model)
    if opts.device == "cuda":
        use_cudnn_attention(opts.cudnn_attention)
    compile_on = levers.resolve_compile(opts, len(dataset))
    # what the planner decides from (a pass over the data set), read once and only when a rule needs it
    planner_inputs = functools.cache(lambda: levers.planner_inputs_of(model_id, dataset, processor))
    checkpointing = levers.resolve_checkpointing(stage, opts, planner_inputs, compile_on)
    if levers.resolve_dequantized(stage, opts, planner_inputs, checkpointing):
        from src.models.dequantize import cache_dequantized_weights

        cache_dequantized_weights(model)
    if levers.resolve_vision_varlen(opts, compile_on):
        use_varlen_vision_attention(model, opts.vision_batched_attention)
    positions = None
    if levers.resolve_host_positions(opts, compile_on) and (backbone := language_backbone(model)) is not None:
        positions = RopePositions.of(backbone)  # in the collator: the loader's workers compute them
        vision_lengths_on_host(model)
    if opts.offload_activations:
        from src.training.offload import offload_activations

        offload_activations(model)
    if compile_on:
        from src.training.compile import compile_regions

        compile_regions(model, include_quantized=opts.compile_quantized)
    log.info("[%s] torch.compile %s", stage.name, "on" if compile_on else "off")

    settings = StageSettings(
        output_dir=str(stage_dir / "trainer"),
        learning_rate=opts.learning_rate or stage.learning_rate * opts.lr_scale,
        epochs=opts.epochs,
        max_steps=opts.max_steps,
        batch_size=opts.batch_size,
        grad_accum=opts.grad_accum,
        seed=opts.seed,
        device=opts.device,
        wandb=opts.wandb,
        run_name=f"{recipe_name}/{stage.name}",
        gradient_checkpointing=checkpointing,
        save_steps=opts.save_steps,
        dataloader_workers=opts.dataloader_workers,
        fused_optimizer=opts.fused_optimizer,
        non_blocking_copies=opts.non_blocking_copies,
        logging_steps=levers.resolve_logging_steps(opts),
    )
    reporter = ProgressCallback(recipe_name, stage.name, opts.output_dir / "loss_history.jsonl")
    size_sampler = size_sampler_for(stage.name, opts, dataset, processor)  # None: the plain shuffle
    trainer_class = SFTTrainer if size_sampler is None else sized_trainer(SFTTrainer, size_sampler)
    trainer = trainer_class(
        model=model,
        args=create_training_config(settings),
        train_dataset=dataset,
        processing_class=processor,
        data_collator=AssistantOnlyCollator(processor, positions),
        callbacks=[reporter.as_trainer_callback(), *callbacks],
    )
    # Our progress lines replace the trainer's printed log dicts.
    trainer.remove_callback(PrinterCallback)
    args = trainer.args
    log.info(
        "[%s] %d samples per optimizer step (micro-batch %d x accumulation %d x %d rank(s))",
        stage.name,
        samples_per_step(args),
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.world_size,
    )
    return PreparedStage(trainer, model, processor, dict(trainable), skipped, reporter, family, size_sampler)


def use_cudnn_attention(enabled: bool) -> None:
    """Allow or forbid cuDNN's attention kernels behind `scaled_dot_product_attention` (process-wide).

    On H100/H200 torch prefers cuDNN's SDPA. In some profiles of a 7B r4 step it cost 0.7-1.2 ms of
    host time a call (0.09 ms in others), but its kernels took half the GPU time of the flash and
    memory-efficient ones, and no run was clearly faster without it (docs/benchmarks.md): so it stays
    on, torch's default; the switch is for the bench.
    """
    import torch

    torch.backends.cuda.enable_cudnn_sdp(enabled)


def skip_adapter_input_casts(model) -> None:
    """Feed LoRA layers their bf16 input as it is.

    PEFT casts each adapter's input to the adapter's fp32 dtype, and bf16 autocast casts it straight
    back for the matmul: two full copies of every wrapped layer's input, 18% of a 7B r4 step's GPU
    time in the profile (docs/benchmarks.md). Without the cast the matmul is the same bf16 one.
    This is what `peft.helpers.disable_input_dtype_casting` does, kept for the whole run.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def save_stage(model, processor, stage_dir: Path, merge: bool, recipe_name: str, stage_name: str) -> Path:
    """The adapter, or (for a stage another starts from) the base with the adapter merged in.

    Written to a temporary directory and renamed, so a killed run never leaves half an output.
    """
    out = stage_output_dir(stage_dir, merge)
    with atomic_dir(out) as tmp:
        if merge:
            model.merge_and_unload().save_pretrained(tmp)
            (tmp / STAGE_MARKER).write_text(json.dumps({"recipe": recipe_name, "stage": stage_name}) + "\n")
        else:
            model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out


def stage_output_dir(stage_dir: Path, merge: bool) -> Path:
    """Where a stage's output goes: `merged/` for a stage another starts from, else `adapter/`."""
    return stage_dir / ("merged" if merge else "adapter")


def last_checkpoint(trainer_dir: Path) -> str | None:
    """The newest complete trainer checkpoint under `trainer_dir`, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None


def is_stage_one_output(path: str | Path) -> bool:
    marker = Path(path) / STAGE_MARKER
    return marker.is_file() and (Path(path) / "config.json").is_file()


def run_recipe(
    recipe, opts: RunOptions, on_stage_done=None, done_stages: dict | None = None
) -> list[StageResult]:
    """All stages of `recipe` in order on one device; a chain passes merged weights along.

    r3 with `opts.checkpoint` skips stage 1 and starts stage 2 from that merged output; other
    recipes treat `opts.checkpoint` as the model to start from. `done_stages` (name -> output of
    stages that already finished, when resuming) are not trained again. `opts.pause_at` counts the
    optimizer steps of every stage in turn (each takes opts.max_steps): the chain stops there, paused.
    """
    stages = recipe.stages or (recipe,)
    model_id = opts.checkpoint or opts.model_id
    if recipe.stages and opts.checkpoint:
        stages = stages[1:]
    done_stages = done_stages or {}
    results = []
    for index, stage in enumerate(stages):
        if stage.name in done_stages:
            log.info("[%s] already finished: %s", stage.name, done_stages[stage.name])
            model_id = str(done_stages[stage.name])
            continue
        is_last = index == len(stages) - 1
        stage_dir = opts.output_dir / stage.name if recipe.stages else opts.output_dir
        pause = stage_pause(opts, index)
        if pause is not None and pause <= 0:
            break  # the pause falls before this stage begins
        progress.emit("stage_start", recipe=recipe.name, stage=stage.name, model=model_id)
        result = train_stage(recipe.name, stage, model_id, opts, stage_dir, merge=not is_last, pause_at=pause)
        free_memory()  # before the next stage or evaluation loads a model beside this one's
        results.append(result)
        if on_stage_done:
            on_stage_done(result)
        if result.paused:
            break
        model_id = str(result.output)
    return results


def stage_pause(opts: RunOptions, index: int) -> int | None:
    """Where stage `index` of a chain pauses, in its own steps: None when the pause (if any) lies beyond it,
    0 or less when it falls before the stage begins."""
    if opts.pause_at is None:
        return None
    local = opts.pause_at - index * opts.max_steps
    return local if local < opts.max_steps else None
