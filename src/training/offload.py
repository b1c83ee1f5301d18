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
hooks on the top module. A CUDA tensor of OFFLOAD_MIN_BYTES or more is packed into pinned host memory.
Small tensors, CPU tensors and forwards without grad (evaluation) are left as they are.

The copies run on a side stream, so they overlap the compute instead of queueing in its stream (at
7B r4, 8 x 2, some 3.3 GB go each way a step: about 65 ms each way over PCIe, 4-5% of the step):
- forward: the side stream waits for what the compute stream has queued (the tensor's producer), then
  copies the tensor to the host; `record_stream` keeps the tensor's memory from reuse until that copy
  has read it;
- backward unpacks roughly in the reverse order of packing (the last layer's input first). Each unpack
  starts the copy back of the tensor packed just before it (a prefetch, one tensor ahead), so that copy
  runs while the compute stream works on this one; the compute stream waits for the side stream only
  when it needs the tensor.
`streams=False` is the first version's way, for comparison: every copy on the compute stream and no
prefetch (on one stream a prefetch overlaps nothing and only holds two device copies at once; on a GPU
it raised the tiny model's peak above the unoffloaded one).

Measured on an H200 (docs/benchmarks.md, 2026-12-01 eighth session), 7B r4, 8 x 2, recompute on,
compiled: 17.93 GiB and 1.417 s a step offloaded, against 19.70 GiB and 1.320 s not offloaded and 18.1
GiB and 1.778 s at 4 x 4 (the lowest setting without offloading). Switched on by `--offload-activations`
(worker and `recipe-run`; it implies recompute). The CPU tests check that the hooks engage only for
training forwards, that prefetching engages, and that no gradient changes.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

OFFLOAD_MIN_BYTES = 1 << 20  # below 1 MiB the copy costs more than the memory it frees


class _Packed:
    """One offloaded tensor: its host copy, the tensor packed before it, and a prefetched device copy."""

    __slots__ = ("device", "host", "previous", "ready")

    def __init__(self, device, host, previous: _Packed | None):
        self.device, self.host, self.previous = device, host, previous
        self.ready = None  # the device copy a prefetch made, until its unpack takes it


class ActivationOffload:
    """The saved-tensor hooks, with a count of what they moved (for logs and tests)."""

    def __init__(
        self, min_bytes: int = OFFLOAD_MIN_BYTES, devices: tuple[str, ...] = ("cuda",), streams=True
    ):
        self.min_bytes = min_bytes
        self.devices = devices  # whose tensors move (the tests add "cpu": a copy, the same round trip)
        self.streams = streams  # CUDA copies on a side stream (module docstring)
        self.offloaded = 0  # tensors moved to the host so far
        self.offloaded_bytes = 0
        self.prefetched = 0  # unpacks whose device copy was started ahead, by the previous unpack
        self._last: _Packed | None = None  # the forward's latest packed tensor
        self._side: dict = {}  # device -> its copy stream

    def start_forward(self) -> None:
        self._last = None  # prefetch links never cross forwards (micro-batches)

    def pack(self, tensor):
        if tensor.device.type not in self.devices or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        import torch

        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=tensor.is_cuda)
        side = self._side_stream(tensor.device)
        if side is None:
            host.copy_(tensor, non_blocking=True)
        else:
            side.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written
            with torch.cuda.stream(side):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(side)  # its memory is reused only once the copy has read it
        self.offloaded += 1
        self.offloaded_bytes += host.numel() * host.element_size()
        self._last = _Packed(tensor.device, host, self._last)
        return self._last

    def unpack(self, packed):
        if not isinstance(packed, _Packed):
            return packed
        if packed.ready is not None:
            tensor, packed.ready = packed.ready, None
            self.prefetched += 1
        else:
            tensor = self._to_device(packed)
        side = self._side_stream(packed.device)
        if side is not None:
            import torch

            compute = torch.cuda.current_stream(packed.device)
            compute.wait_stream(side)  # the copy back has landed
            tensor.record_stream(compute)  # made on the side stream, used on this one
        before = packed.previous
        if self.streams and before is not None and before.ready is None:
            before.ready = self._to_device(before)  # most likely the next unpack: copy it back meanwhile
        return tensor

    def _to_device(self, packed: _Packed):
        side = self._side_stream(packed.device)
        if side is None:
            return packed.host.to(packed.device, non_blocking=True)
        import torch

        with torch.cuda.stream(side):  # after the forward's copy to the host, on the same stream
            return packed.host.to(packed.device, non_blocking=True)

    def _side_stream(self, device):
        if not self.streams or device.type != "cuda":
            return None
        if device not in self._side:
            import torch

            self._side[device] = torch.cuda.Stream(device)
        return self._side[device]

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
            offload.start_forward()
            context = offload.hooks()
            context.__enter__()
            active.append(context)

    def leave(module, args, kwargs, output):
        if active:
            active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)
    log.info(
        "activation offloading: saved tensors of %d bytes or more wait on the host%s",
        offload.min_bytes,
        " (copies on a side stream, prefetched one ahead)" if offload.streams else "",
    )
    return offload
