"""The plain path the benchmark compares against: what a user writes by hand.

The same model (loaded as the recipe loads it), the same LoRA and freeze policy, gradient
checkpointing on, bf16 autocast, and a bare forward/backward/AdamW loop over batches built once
and kept on the GPU, so it never waits for data. Nothing of the training core's speed work.
"""

from __future__ import annotations


def prebuilt_batches(dataset, processor, batch_size: int, device: str, count: int = 4) -> list[dict]:
    """`count` batches collated once by the training collator and moved to the device."""
    from src.data.collators import AssistantOnlyCollator

    collate = AssistantOnlyCollator(processor)
    batches = []
    for index in range(count):
        rows = [dataset[(index * batch_size + i) % len(dataset)] for i in range(batch_size)]
        batches.append({key: value.to(device) for key, value in collate(rows).items()})
    return batches


def train_plain(model, batches: list[dict], steps: int, learning_rate: float, timer, device: str) -> None:
    """`steps` optimizer steps, cycling through `batches`; `timer` is a measure.StepTimer."""
    import torch

    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    timer.begin()
    for step in range(steps):
        with autocast:
            loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.step_done()
