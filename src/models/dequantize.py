"""QLoRA with its frozen 4-bit weights dequantized once, not on every forward and backward.

A QLoRA stage (r1, r3's stage 2) keeps the LLM's linear weights in 4-bit nf4. In training, bitsandbytes
multiplies by them by dequantizing the weight to bf16 and calling `F.linear`: on every forward, and again
on every backward (bitsandbytes 0.50, `MatMul4Bit`; its fused 4-bit kernel only serves up to 512 tokens
a call). The weights are frozen, so every one of those dequantizations gives the same tensor. Each also
costs the host a few hundred microseconds of Python and kernel launches: a 2B r1 step spent 61% of its
time with the GPU busy (docs/benchmarks.md).

`cache_dequantized_weights(model)` dequantizes each 4-bit linear once and keeps the bf16 result beside the
4-bit weight (a non-persistent buffer: never saved, never in a state_dict); the layer's forward then runs
`F.linear` with it. The numbers are those of bitsandbytes' own training path, which computes
`F.linear(x, dequantize_4bit(W))` forward and `grad @ dequantize_4bit(W)` backward; only the copy is kept.
The cost is memory: 2 bytes a weight (about 2.6 GiB for the 2B LLM, 13 GiB for 7B), so the worker keeps
it only where the planner says it fits beside the stage (`src.training.run.resolve_dequantized`), and a
4-bit stage asked for its smallest setting stays 4-bit.

    from src.models.dequantize import cache_dequantized_weights
    cached_bytes = cache_dequantized_weights(peft_model)   # after loading in 4-bit, before training

A layer holding the copy is no longer a 4-bit layer to the compiler (`is_dequantized`): regional
compilation traces it like any bf16 layer.
"""

from __future__ import annotations

import logging
import types

log = logging.getLogger(__name__)

BUFFER = "dequantized_weight"  # the bf16 copy's name on each bitsandbytes Linear4bit


def cache_dequantized_weights(model) -> int:
    """Give every bitsandbytes 4-bit linear of `model` its weight in its compute dtype, dequantized once,
    and make its forward use it. Returns the bytes the copies hold (0: no 4-bit layer)."""
    import bitsandbytes as bnb
    import torch

    cached = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or hasattr(module, BUFFER):
            continue
        dtype = module.compute_dtype or torch.bfloat16
        with torch.no_grad():
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
        module.register_buffer(BUFFER, weight, persistent=False)
        module.forward = types.MethodType(_dequantized_forward, module)
        cached += weight.numel() * weight.element_size()
    if cached:
        log.info("4-bit weights dequantized once: %.2f GiB of bf16 copies", cached / 2**30)
    return cached


def _dequantized_forward(self, x):
    # bitsandbytes' Linear4bit.forward with the dequantized weight: the input in the compute dtype, the
    # bias cast alike, the output back in the input's dtype.
    import torch.nn.functional as F

    weight = getattr(self, BUFFER)
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def is_dequantized(module) -> bool:
    """Whether every 4-bit linear under `module` (if any) runs on its dequantized copy."""
    import bitsandbytes as bnb

    layers = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]  # not PEFT's wrapper of one
    return bool(layers) and all(hasattr(m, BUFFER) for m in layers)
