"""The vision tower's attention as one variable-length kernel a block, not one SDPA call per image.

Qwen2-VL's vision attention (and Qwen2.5-VL's) handles the images of a batch in two ways, chosen by
the vision config's attention implementation:

* any name with "flash" in it: one call with the packed tokens and `cu_seqlens`, the images' boundaries;
* anything else (the "sdpa" the models load with): `lengths.tolist()` three times, then one SDPA call per
  image, in every block. At 8 images a micro-batch and 32 blocks that is 96 reads back from the GPU and
  256 attention calls forward (and 256 backward) a micro-batch: 384 of the 792 host syncs of two 7B r4
  steps (docs/benchmarks.md), each emptying the GPU's queue while the host launches the next kernels.
  Under `torch.compile` the `.tolist()` also breaks each vision block's graph.

`use_varlen_vision_attention(model)` registers `varlen_vision_attention` with transformers'
AttentionInterface under a name that takes the first path, and sets it on the vision config only (the
LLM keeps SDPA). On a CUDA bf16/fp16 model it calls torch's flash-attention varlen kernel
(`torch.nn.attention.varlen.varlen_attn`, differentiable, no host reads, traceable by Dynamo). Anywhere
else (the CPU, fp32, an older torch) it falls back to SDPA with the boundaries read once a block, and one
batched call when every image has the same number of patches, which is the same arithmetic as the
model's own loop (tests/test_vision_attention.py).

    from src.models.vision_attention import use_varlen_vision_attention
    use_varlen_vision_attention(model)        # after loading, before or after PEFT wrapping

The training core uses it when it compiles (`RunOptions.vision_varlen_attention`, None by default:
`run.resolve_vision_varlen`). Measured on H200s (docs/benchmarks.md, 2026-11-30, fourth session): compiled,
it keeps every vision block one graph (0 graph breaks instead of 2) and took 7B r4 from 1.055 to 0.977 s
a step; eager, it halved the host syncs but was no faster (7B) or 2-4% slower (2B), because torch's flash
varlen kernel (head dim 80 padded to 96) spends more GPU time than cuDNN's per-image Hopper kernels.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

# "flash" in the name is what makes Qwen2-VL's vision attention pass `cu_seqlens` instead of splitting.
VARLEN_ATTENTION = "recipe_runner_flash_varlen"
FLASH_MAX_HEAD_DIM = 256


def varlen_vision_attention(
    module,
    query,
    key,
    value,
    attention_mask=None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    is_causal: bool = False,
    **kwargs,
):
    """Attention within each image of a packed batch: (1, heads, tokens, dim) in, (1, tokens, heads, dim)
    out, as transformers' flash-attention functions return it. Vision attention has no mask, no dropout
    and is not causal; anything else is refused rather than computed differently."""
    if attention_mask is not None or dropout or is_causal or cu_seq_lens_q is None:
        raise ValueError(
            "varlen_vision_attention is for Qwen2-VL's vision tower only (no mask, no dropout, not causal, "
            "packed images with cu_seqlens); keep the model's own attention for other modules"
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    if flash_varlen_usable(q, scale):
        out = _flash_varlen(q, k, v, cu_seq_lens_q, max_length_q)
    else:
        out = _sdpa_per_image(q, k, v, cu_seq_lens_q, scale)
    return out.unsqueeze(0), None


def flash_varlen_usable(q, scale: float) -> bool:
    """Whether torch's flash varlen kernel can run these queries exactly as SDPA would."""
    import torch

    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] > FLASH_MAX_HEAD_DIM:
        return False
    if q.shape[-1] % 8 or abs(scale - q.shape[-1] ** -0.5) > 1e-9:  # the kernel's default scale only
        return False
    return _varlen_kernel() is not None


@functools.cache  # looked up by every vision block of every forward
def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch before 2.10
        return None
    return varlen_attn


def _flash_varlen(q, k, v, cu_seqlens, max_seqlen):
    import torch

    cu = cu_seqlens.to(device=q.device, dtype=torch.int32, non_blocking=True)
    if max_seqlen is None:  # transformers passes it (one read a forward); compute it if not
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    max_seqlen = int(max_seqlen)
    return _varlen_kernel()(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_seqlen, max_seqlen)


def _sdpa_per_image(q, k, v, cu_seqlens, scale: float):
    """SDPA within each image: one batched call when all images have as many patches, else one each."""
    import torch
    import torch.nn.functional as F

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    tokens, heads, dim = q.shape
    if len(set(lengths)) == 1:
        n, length = len(lengths), lengths[0]
        batched = [t.reshape(n, length, heads, dim).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*batched, scale=scale)  # (images, heads, length, dim)
        return out.transpose(1, 2).reshape(tokens, heads, dim)
    outs = [
        F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in parts), scale=scale)[0]
        for parts in zip(*(torch.split(t, lengths) for t in (q, k, v)), strict=True)
    ]
    return torch.cat(outs, dim=1).transpose(0, 1)


def vision_configs(model) -> list:
    """The vision configs of a (possibly PEFT-wrapped) Qwen2-VL model: the config its vision blocks read."""
    found = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if type(module).__name__.endswith("VisionAttention") and config is not None:
            if not any(config is seen for seen in found):
                found.append(config)
    return found


def use_varlen_vision_attention(model) -> bool:
    """Route `model`'s vision attention through `varlen_vision_attention`; returns whether it found one.

    Only the vision config changes (through its `_attn_implementation` setter, as transformers' own
    `set_attn_implementation` does); the LLM's attention and the saved config stay as loaded.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_vision_attention)
    configs = vision_configs(model)
    for config in configs:
        config._attn_implementation = VARLEN_ATTENTION
    if configs:
        log.info("vision attention: one varlen call a block (%s)", VARLEN_ATTENTION)
    return bool(configs)
