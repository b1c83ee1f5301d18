"""What one run needs beyond its recipe (`RunOptions`): the worker fills it from its flags (the table in
src/contract/flags.py names the fields a flag fills); the benchmark and the tests build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunOptions:
    """Everything a run needs beyond the recipe; the worker fills it from its flags."""

    model_id: str
    dataset: str
    output_dir: Path
    device: str = "cpu"
    epochs: float = 3
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float | None = None
    seed: int = 42
    wandb: bool = False
    checkpoint: str | None = None
    skip_bad_records: bool = False
    gradient_checkpointing: bool | None = None
    save_steps: int = 0  # checkpoint every N optimizer steps (0: only the final output)
    resume: bool = False  # skip finished stages; continue the others from their last checkpoint
    # Speed levers (docs/benchmarks.md says what each bought); the defaults are the fast path.
    dataloader_workers: int | None = None  # None: 4 on a GPU (config.gpu_loader_workers), 0 on the CPU
    fused_optimizer: bool = True  # fused AdamW kernel on GPUs
    frozen_vision_no_grad: bool = True  # run a vision tower with nothing to train outside autograd
    adapter_input_casts: bool = False  # on GPUs: PEFT's fp32 copy of every LoRA input (autocast undoes it)
    cudnn_attention: bool = True  # SDPA may pick cuDNN's kernels (torch's default; see use_cudnn_attention)
    # The vision tower's attention as one flash varlen call a block, not one SDPA call per image and three
    # host reads a block (src/models/vision_attention.py); GPUs only. None: when compiling (resolve_...).
    vision_varlen_attention: bool | None = None
    # With it, images of one size attend in one batched SDPA call (cuDNN on Hopper), not the varlen kernel.
    vision_batched_attention: bool = True
    # Positions worked out on the host, not by GPU reads (host_positions.py): 290 of the 353 host syncs of
    # two compiled 7B r4 steps are in the model's get_rope_index. None: when compiling (resolve_host_...).
    host_positions: bool | None = None
    # Batches copied to the GPU without the host waiting (config.accelerator_options says why); GPUs only.
    non_blocking_copies: bool = True
    # The loss is read back from the GPU (a host sync) and logged every this many optimizer steps, and at
    # the last step. None: every step on the CPU, every GPU_LOGGING_STEPS on a GPU (resolve_logging_steps).
    logging_steps: int | None = None
    image_root: str | None = None  # where the data set's images are, when not where load_records looks
    min_pixels: int | None = None  # image resize limits (None: src.planning.memory.pixel_limits' defaults)
    max_pixels: int | None = None
    compile: bool | None = None  # torch.compile the model's repeated regions; None: resolve_compile decides
    compile_quantized: bool = False  # compile 4-bit (QLoRA) decoder layers too (compile.py says why not)
    # Micro-batches drawn from images of one size (src/training/size_groups.py). None: on a GPU when the
    # training images are of more than one size (levers.resolve_group_by_size).
    group_by_size: bool | None = None
    # What recompute keeps (the blocks' inputs) waits in host memory (offload.py); implies recompute.
    offload_activations: bool = False
    # 4-bit (QLoRA) weights dequantized once and kept in bf16 (src/models/dequantize.py); None: where the
    # planner says the copies fit (resolve_dequantized), on GPUs only.
    dequantize_once: bool | None = None
    # The learning-rate search (recipe_runner/search/): the validation split held out of training, a pause
    # at a rung with the whole run's schedule, every stage's rate scaled, and the validation loss measured.
    val_fraction: float = 0.0
    pause_at: int | None = None  # optimizer steps over every stage of a chain; needs max_steps
    lr_scale: float = 1.0
    validation_loss: bool = False
    # The last stage's trained model stays in memory for the worker to score (a search trial's validation
    # scoring), instead of being loaded again from what was saved. 4-bit stages are always loaded again:
    # evaluation scores an adapter on the bf16 base (src/eval/predict.py load_for_eval).
    keep_trained: bool = False
