"""The plain path the benchmark compares against: what a careful user writes by hand.

The same model (loaded as the recipe loads it), the same LoRA and freeze policy, bf16 autocast,
fused AdamW on GPUs, and a bare forward/backward/step loop over micro-batches built once and kept on
the device, so it never waits for data; gradient accumulation to the same samples per optimizer
step as the core. The micro-batches take the data set's samples in file order, as a user's own loop
over the data would: on images of mixed sizes (`python -m src.bench --image-sizes mixed`) they mix
sizes as they come, where the core groups them (src/training/size_groups.py). Recompute (gradient
checkpointing) is a parameter: the benchmark searches for the loop's own best setting that fits the
card (src/bench/rows.py, `_run_plain`). Nothing of the training core's speed work.
"""

from __future__ import annotations

PREBUILT_BATCHES = 4


def prebuilt_batches(
    dataset, processor, batch_size: int, device: str, count: int = PREBUILT_BATCHES
) -> list[dict]:
    """`count` batches collated once by the training collator and moved to the device."""
    from src.data.collators import AssistantOnlyCollator

    collate = AssistantOnlyCollator(processor)
    batches = []
    for rows in batch_rows(len(dataset), batch_size, count):
        collated = collate([dataset[i] for i in rows])
        batches.append({key: value.to(device) for key, value in collated.items()})
    return batches


def batch_rows(dataset_size: int, batch_size: int, count: int = PREBUILT_BATCHES) -> list[list[int]]:
    """The samples of each prebuilt batch: the data set's first ones in file order (wrapping round)."""
    return [[(index * batch_size + i) % dataset_size for i in range(batch_size)] for index in range(count)]


def set_recompute(model, checkpointing: bool) -> None:
    """Gradient checkpointing on (non-reentrant, inputs marked as needing grad) or off."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()


def train_plain(
    model,
    batches: list[dict],
    steps: int,
    learning_rate: float,
    timer,
    device: str,
    grad_accum: int = 1,
    checkpointing: bool = True,
) -> None:
    """`steps` optimizer steps of `grad_accum` micro-batches each, cycling through `batches`.

    `timer` is a measure.StepTimer. The loss of each micro-batch is divided by `grad_accum`, so the
    gradient is the mean over the optimizer step's samples, as the trainer computes it.
    """
    import torch

    model.config.use_cache = False
    set_recompute(model, checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, fused=device == "cuda")
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    timer.begin()
    micro_step = 0
    for _ in range(steps):
        for _ in range(grad_accum):
            with autocast:
                loss = model(**batches[micro_step % len(batches)]).loss / grad_accum
            loss.backward()
            micro_step += 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.step_done()
