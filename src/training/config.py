"""Training settings for one stage: `create_training_config()` -> trl.SFTConfig.

Choices that differ from TRL's defaults, and why:
  * max_length=None: TRL's 1024 silently cuts answers (or image tokens) of long samples.
  * remove_unused_columns=False and skip_prepare_dataset: our collator builds the batch from the
    raw conversation and images; TRL must neither drop those columns nor tokenise them itself.
  * non-reentrant gradient checkpointing: reentrant checkpointing leaves vision LoRA weights
    without gradients when pixel inputs do not require grad (peft#2880).
  * bf16 only on a GPU that has it; the CPU trains in fp32.
  * no tqdm bars: the worker prints one progress line per logging step instead.
  * on a GPU: fused AdamW, and batches collated ahead in worker processes, so the processor's
    image work never starves the GPU (docs/benchmarks.md gives what each bought).
  * data parallelism (several ranks, `src/training/distributed.py`): the trainer reads the ranks from
    the environment; every LoRA tensor gets a gradient, so DDP need not search for unused ones; the
    CPU uses gloo; and a collective gives up after `ddp_timeout_seconds()` instead of the default
    30 minutes, so a rank that died never leaves the others waiting long (the worker sets up the
    process group with that timeout itself: accelerate passes none on the CPU).
  * non_blocking_copies (`accelerator_options`): on a GPU, batches go to the card without the host
    waiting for the copy; the bench's `fast-nonblocking` row is the blocking copy, for comparison.
  * no NaN filter on the logged loss: it read each micro-batch's loss back from the GPU (a host sync
    after every backward) only to keep a NaN out of the logged mean; a NaN now shows as NaN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from src.contract.env import DDP_TIMEOUT_ENV

# Long enough for rank 0 to merge and save a 7B stage-1 model while the others wait at a barrier.
DEFAULT_DDP_TIMEOUT_SECONDS = 300


def ddp_timeout_seconds() -> int:
    """How long a rank waits in a collective (or barrier) before failing; env overrides."""
    value = os.environ.get(DDP_TIMEOUT_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_DDP_TIMEOUT_SECONDS


def join_process_group(device: str) -> None:
    """In a rank: join the others (NCCL on GPUs, gloo on the CPU) with the bounded collective timeout.

    Done by the worker before the model loads, so barriers work from the start and the timeout holds
    on the CPU too (the trainer would otherwise set the group up with accelerate's defaults).
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = timedelta(seconds=ddp_timeout_seconds())
    if device == "cuda":
        dist.init_process_group(
            "nccl", timeout=timeout, device_id=torch.device("cuda", torch.cuda.current_device())
        )
    else:
        dist.init_process_group("gloo", timeout=timeout)


@dataclass(frozen=True)
class StageSettings:
    """What one stage's trainer needs to know, resolved from flags and the recipe."""

    output_dir: str
    learning_rate: float
    epochs: float = 3
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 42
    device: str = "cpu"
    wandb: bool = False
    run_name: str | None = None
    logging_steps: int = 1
    gradient_checkpointing: bool | None = None  # None: on for GPUs, off on the CPU
    save_steps: int = 0  # 0: no intermediate checkpoints
    warmup_fraction: float = 0.03  # of all steps; transformers 5 takes a float below 1 as a ratio
    dataloader_workers: int | None = None  # None: gpu_loader_workers() on a GPU, 0 on the CPU
    fused_optimizer: bool = True  # only on a GPU; the CPU has no fused AdamW kernel worth it
    non_blocking_copies: bool = True  # only on a GPU: each batch's host-to-device copy does not wait


# Loader processes on a GPU. With two, a 7B r4 step (8 images of 644x476 a micro-batch) waited 63-122 ms a
# micro-batch on the loader; four made it 5-11% faster in five paired rounds (docs/benchmarks.md).
GPU_DATALOADER_WORKERS = 4
FEW_CORES = 8  # below this many usable cores (a small share of a host), two loader processes


def gpu_loader_workers() -> int:
    """Loader processes for a GPU worker: four, or two where it may run on fewer than FEW_CORES cores
    (the launcher pins each GPU's workers to that GPU's share of the host)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return GPU_DATALOADER_WORKERS if cores >= FEW_CORES else 2


def accelerator_options(settings: StageSettings, on_gpu: bool) -> dict | None:
    """The trainer's `accelerator_config` (transformers builds an AcceleratorConfig from the dict), or
    None for its defaults.

    accelerate's DataLoaderShard moves each batch with a blocking `.to(device)`: when the host runs
    ahead of the GPU (the core is host-bound), that copy waits behind the GPU's queued kernels, and
    the host sits idle instead of preparing the next step. With `non_blocking` the copy is queued
    too; it needs pinned host memory to be truly asynchronous, which GPUs get
    (`dataloader_pin_memory=on_gpu`). The CPU has no copy to overlap.
    """
    return {"non_blocking": True} if settings.non_blocking_copies and on_gpu else None


def create_training_config(settings: StageSettings):
    """An SFTConfig for one stage."""
    import torch
    from trl import SFTConfig

    from src.utils.gpu import world_size

    on_gpu = settings.device == "cuda"
    checkpointing = on_gpu if settings.gradient_checkpointing is None else settings.gradient_checkpointing
    workers = settings.dataloader_workers
    if workers is None:
        workers = gpu_loader_workers() if on_gpu else 0
    return SFTConfig(
        output_dir=settings.output_dir,
        run_name=settings.run_name,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup_fraction,
        optim="adamw_torch_fused" if on_gpu and settings.fused_optimizer else "adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        fp16=False,
        use_cpu=not on_gpu,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=None,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        logging_steps=settings.logging_steps,
        logging_strategy="steps",
        logging_nan_inf_filter=False,  # the module docstring says why
        # Checkpoints (adapter, optimizer, scheduler, RNG) let `--resume` continue where a run died.
        save_strategy="steps" if settings.save_steps > 0 else "no",
        save_steps=settings.save_steps if settings.save_steps > 0 else 500,
        save_total_limit=2,
        report_to=["wandb"] if settings.wandb else [],
        disable_tqdm=True,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        dataloader_prefetch_factor=2 if workers > 0 else None,
        dataloader_pin_memory=on_gpu,  # pinned batches: what non_blocking copies need to overlap
        accelerator_config=accelerator_options(settings, on_gpu),
        # A backend makes accelerate set up a process group even for one process: only under DDP.
        ddp_backend="gloo" if not on_gpu and world_size() > 1 else None,  # None on GPUs: NCCL
        ddp_find_unused_parameters=False,
        ddp_timeout=ddp_timeout_seconds(),
    )
