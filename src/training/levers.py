"""Which speed and memory levers a stage uses: compilation, recompute, 4-bit weights dequantized once, the
vision attention path, positions on the host, how often the loss is read, micro-batches grouped by image
size. Each `resolve_*` applies the flag as asked, else its rule for "auto" (the planner's where memory
decides, measured gains elsewhere); src/training/run.py's prepare_stage asks them in turn.
docs/benchmarks.md has what each lever bought.
"""

from __future__ import annotations

import logging

from src.planning.memory import choose_checkpointing, recompute_asked
from src.planning.step_time import compile_chosen, stage_steps
from src.training.options import RunOptions
from src.utils.gpu import world_size

log = logging.getLogger(__name__)


def resolve_compile(opts: RunOptions, dataset_size: int = 0) -> bool:
    """Whether to torch.compile the model's repeated regions: as asked, or the rule for "auto".

    "auto" compiles on a GPU when the stage runs at least step_time.COMPILE_AUTO_MIN_STEPS optimizer
    steps, the length after which the measured saving repays the compilation; never on the CPU.
    """
    return compile_chosen(opts.compile, opts.device == "cuda", planned_steps(opts, dataset_size))


def resolve_vision_varlen(opts: RunOptions, compile_on: bool) -> bool:
    """Whether the vision tower attends through one flash varlen call a block: as asked, by default when
    compiling on a GPU. Compiled, it keeps each vision block one graph and bought 8% of a 7B r4 step;
    eager, cuDNN's per-image kernels were as fast or faster (docs/benchmarks.md, 2026-11-30 fourth)."""
    if opts.device != "cuda":
        return False
    return compile_on if opts.vision_varlen_attention is None else opts.vision_varlen_attention


def resolve_group_by_size(opts: RunOptions, image_keys) -> bool:
    """Whether micro-batches are drawn from images of one size (src/training/size_groups.py): as asked; for
    "auto", on a GPU when the training images are of more than one size (`image_keys()`: each sample's
    vision patches, read from the files' headers only then). The batched vision attention that uniform
    micro-batches allow is a GPU path; on the CPU, and on data of one size, the order stays the plain
    shuffled one."""
    if opts.group_by_size is not None:
        return opts.group_by_size
    return opts.device == "cuda" and len(set(image_keys())) > 1


GPU_LOGGING_STEPS = 10  # TRL's default interval too


def resolve_logging_steps(opts: RunOptions) -> int:
    """How often the loss is read back and logged: as asked; by default every step on the CPU and every
    GPU_LOGGING_STEPS steps on a GPU.

    Reading the loss makes the host wait for the GPU at the step's end; while it then logs, fetches
    the next batch and launches its first kernels, the GPU idles. Compiled 7B r1 on an H200 ran 3.7%
    faster logging every 10 steps with non-blocking batch copies (docs/benchmarks.md, 2026-12-01
    seventh). Every step still reports its progress (step, memory), without the loss.
    """
    if opts.logging_steps is not None:
        return opts.logging_steps
    return GPU_LOGGING_STEPS if opts.device == "cuda" else 1


def resolve_host_positions(opts: RunOptions, compile_on: bool) -> bool:
    """Whether positions are worked out on the host: as asked, by default when compiling.

    Compiled, a step launches few kernels and the GPU reads of Qwen2-VL's position code are most of its
    host syncs. Measured on H200s, 7B (docs/benchmarks.md, 2026-12-01 sixth): the GPU busy 93.4% of an r4
    step instead of 87.0% and 91.1% of an r1 step instead of 86.3%, the steps as fast or 1% faster.
    Eager, it was no faster (fourth session), so it stays off there.
    """
    return compile_on if opts.host_positions is None else opts.host_positions


def planned_steps(opts: RunOptions, dataset_size: int) -> int:
    """Optimizer steps of one stage: --max-steps, else the epochs over the data set (all ranks together)."""
    return stage_steps(
        opts.max_steps, opts.epochs, dataset_size, opts.batch_size * opts.grad_accum * world_size()
    )


def resolve_checkpointing(stage, opts: RunOptions, planner_inputs, compiled: bool = False) -> bool | None:
    """Gradient checkpointing as asked; on with activation offloading; for "auto" on one GPU, off when
    the planner says it fits.

    Recomputing activations costs about a third of a step; it is only worth it when the
    activations would not fit (`compiled` layers save fewer). None leaves the CPU rule to the config
    (off). A data-parallel rank holds a whole model on one GPU, so the planner decides for it as for a
    single GPU; each rank asks about its own GPU. `planner_inputs()` gives what the planner needs
    (`planner_inputs_of`).
    """
    asked = recompute_asked(opts.gradient_checkpointing, opts.offload_activations)
    if asked is not None:
        return asked
    if opts.device != "cuda":
        return None
    if sharded():  # stay lean: the split is tight
        return True

    shape, patches, text_tokens, capacity = planner_inputs()
    checkpointing = choose_checkpointing(
        shape, stage, opts.batch_size, capacity, patches, text_tokens, compiled=compiled
    )
    log.info(
        "[%s] gradient checkpointing %s (planner: batch %d, %d image patches + %d text tokens a sample, "
        "%.1f GiB available)",
        stage.name,
        "on" if checkpointing else "off",
        opts.batch_size,
        patches,
        text_tokens,
        capacity / 2**30,
    )
    return checkpointing


def resolve_dequantized(stage, opts: RunOptions, planner_inputs, checkpointing) -> bool:
    """Whether a 4-bit stage dequantizes its weights once (src/models/dequantize.py): as asked; for "auto"
    on one GPU, when the planner says the bf16 copies fit beside the stage at its chosen setting (inside
    the launcher's reservation when the GPU is shared). Never for a bf16 stage, nor by default on the CPU
    (where it buys nothing) or sharded over several GPUs (where memory is tight)."""
    if not stage.quantized:
        return False
    if opts.dequantize_once is not None:
        return opts.dequantize_once
    if opts.device != "cuda" or sharded():
        return False
    from src.planning.memory import choose_dequantized, dequantized_copy_bytes

    shape, patches, text_tokens, capacity = planner_inputs()
    chosen = choose_dequantized(
        shape, stage, opts.batch_size, capacity, patches, text_tokens, bool(checkpointing)
    )
    log.info(
        "[%s] 4-bit weights %s (%.1f GiB of bf16 copies, %.1f GiB available)",
        stage.name,
        "dequantized once" if chosen else "dequantized on every use: the copies do not fit",
        dequantized_copy_bytes(shape, stage) / 2**30,
        capacity / 2**30,
    )
    return chosen


def sharded() -> bool:
    """One process over several visible GPUs: the model is split across them (loader.device_map_for)."""
    import torch

    return world_size() == 1 and torch.cuda.device_count() > 1


def planner_inputs_of(model_id: str, dataset, processor) -> tuple:
    """(model shape, image patches and text tokens of the largest sample, usable GPU bytes): what the
    memory planner's choices at training time are made from."""
    from src.planning.parameters import ModelShape
    from src.training.memory import largest_sample
    from src.utils.gpu import available_gpu_bytes

    patches, text_tokens = largest_sample(dataset, processor)
    return ModelShape.from_model_dir(model_id), patches, text_tokens, available_gpu_bytes()
