"""Activation offloading: what autograd saves during a training forward waits in pinned host memory.

With gradient checkpointing on, autograd keeps little per decoder layer or vision block: the block's
inputs (non-reentrant checkpointing saves them as ordinary saved tensors) and whatever lies outside the
blocks (embeddings, the loss's inputs). At 7B r4, 16 images a micro-batch, the block inputs alone are
about 3.5 GB. Offloading them is what Unsloth's "offloaded gradient checkpointing" does, and it is the
lever the issue "training speed" names for its 18 GiB target (docs/benchmarks.md: at 18 GiB the core
runs 4 x 4 with recompute; 16 x 1 with recompute ran 35% faster but needed 22.8 GiB).

    from src.training.offload import offload_activations
    offload_activations(model)      # every training forward (grad on) of `model` from now on

How: `torch.autograd.graph.saved_tensors_hooks` around the model's forward, entered and left by forward
hooks on the top module. A CUDA tensor of OFFLOAD_MIN_BYTES or more is packed into pinned host memory
with a non-blocking copy, and unpacked with a non-blocking copy back when backward needs it. Both copies
are ordered on the current stream, so the host never waits and the GPU memory is reused only after the
copy read it. Small tensors, CPU tensors and forwards without grad (evaluation) are left as they are.

Not yet measured on a GPU (RunOptions.offload_activations, off by default; the bench's `lean+offload`
rows). The CPU tests check that the hooks engage only for training forwards and change no gradient.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

OFFLOAD_MIN_BYTES = 1 << 20  # below 1 MiB the copy costs more than the memory it frees


class ActivationOffload:
    """The saved-tensor hooks, with a count of what they moved (for logs and tests)."""

    def __init__(self, min_bytes: int = OFFLOAD_MIN_BYTES, devices: tuple[str, ...] = ("cuda",)):
        self.min_bytes = min_bytes
        self.devices = devices  # whose tensors move (the tests add "cpu": a copy, the same round trip)
        self.offloaded = 0  # tensors moved to the host so far
        self.offloaded_bytes = 0

    def pack(self, tensor):
        if tensor.device.type not in self.devices or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        import torch

        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=tensor.is_cuda)
        host.copy_(tensor, non_blocking=True)
        self.offloaded += 1
        self.offloaded_bytes += host.numel() * host.element_size()
        return tensor.device, host

    @staticmethod
    def unpack(packed):
        if isinstance(packed, tuple):
            device, host = packed
            return host.to(device, non_blocking=True)
        return packed

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def offload_activations(model, offload: ActivationOffload | None = None) -> ActivationOffload:
    """Offload what `model`'s training forwards save for backward; returns the hooks' counter."""
    import torch

    offload = offload or ActivationOffload()
    active = []  # the hooks context of the forward in progress, if any

    def enter(module, args, kwargs):
        if module.training and torch.is_grad_enabled() and not active:
            context = offload.hooks()
            context.__enter__()
            active.append(context)

    def leave(module, args, kwargs, output):
        if active:
            active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)
    log.info("activation offloading: saved tensors of %d bytes or more wait on the host", offload.min_bytes)
    return offload
