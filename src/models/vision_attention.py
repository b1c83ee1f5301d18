"""The vision tower's attention as one variable-length kernel a block, not one SDPA call per image.

Qwen2-VL's vision attention (and Qwen2.5-VL's and Qwen3-VL's, whose tower is built the same way) handles
the images of a batch in two ways, chosen by
the vision config's attention implementation:

* any name with "flash" in it: one call with the packed tokens and `cu_seqlens`, the images' boundaries;
* anything else (the "sdpa" the models load with): `lengths.tolist()` three times, then one SDPA call per
  image, in every block. At 8 images a micro-batch and 32 blocks that is 96 reads back from the GPU and
  256 attention calls forward (and 256 backward) a micro-batch: 384 of the 792 host syncs of two 7B r4
  steps (docs/benchmarks.md), each emptying the GPU's queue while the host launches the next kernels.
  Under `torch.compile` the `.tolist()` also breaks each vision block's graph.

`use_varlen_vision_attention(model)` registers `varlen_vision_attention` with transformers'
AttentionInterface under a name that takes the first path, and sets it on the vision config only (the
LLM keeps SDPA). When every image of the batch has the same number of patches (told by shapes alone,
`equal_images`) it makes one batched SDPA call over (images, heads, patches, dim), where torch picks
cuDNN's Hopper kernels. Otherwise, on a CUDA bf16/fp16 model, it calls torch's flash-attention varlen
kernel (`torch.nn.attention.varlen.varlen_attn`). Both are differentiable, read nothing back from the GPU
and trace through Dynamo. Anywhere else (the CPU, fp32, an older torch) mixed sizes fall back to one SDPA
call per image with the boundaries read once a block. All are the same arithmetic as the model's own
loop (tests/unit/src/models/test_vision_attention.py).

    from src.models.vision_attention import use_varlen_vision_attention
    use_varlen_vision_attention(model)        # after loading, before or after PEFT wrapping

The training core uses it when it compiles (`RunOptions.vision_varlen_attention`, None by default:
`run.resolve_vision_varlen`; `RunOptions.vision_batched_attention` turns the batched call off). Measured
on H200s (docs/benchmarks.md): compiled, the varlen kernel keeps every vision block one graph (0 graph
breaks instead of 2) and took 7B r4 from 1.055 to 0.977 s a step (2026-11-30, fourth session); eager, it
halved the host syncs but was no faster, because torch's flash varlen kernel (head dim 80 padded to 96)
spends more GPU time than cuDNN's Hopper kernels. Batched, 16 images of 1564 patches attend in 2.69 ms
forward and backward instead of 4.19 (`python -m src.bench.attention`), and a compiled 7B r4 step took
0.8625 s instead of 0.9516 (2026-12-01, sixth session).
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

# "flash" in the name is what makes Qwen2-VL's vision attention pass `cu_seqlens` instead of splitting.
VARLEN_ATTENTION = "recipe_runner_flash_varlen"
VARLEN_ONLY_ATTENTION = "recipe_runner_flash_varlen_only"  # never the batched call
VARLEN_NAMES = (VARLEN_ATTENTION, VARLEN_ONLY_ATTENTION)
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
    batch_equal_images: bool = True,
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
    images = equal_images(q.shape[0], cu_seq_lens_q, max_length_q) if batch_equal_images else None
    if images is not None:
        out = _sdpa_batched(q, k, v, images, scale)
    elif flash_varlen_usable(q, scale):
        out = _flash_varlen(q, k, v, cu_seq_lens_q, max_length_q)
    else:
        out = _sdpa_per_image(q, k, v, cu_seq_lens_q, scale)
    return out.unsqueeze(0), None


def equal_images(tokens: int, cu_seqlens, max_seqlen: int | None) -> int | None:
    """How many images the batch holds when every one has `max_seqlen` patches, else None.

    Read from shapes and the int transformers passes, never from the GPU: n images of at most
    `max_seqlen` patches fill `n * max_seqlen` tokens only when all have exactly that many.
    """
    images = cu_seqlens.shape[0] - 1
    if max_seqlen is None or images < 1:
        return None
    return images if images * max_seqlen == tokens else None


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
    if len(set(lengths)) == 1:
        return _sdpa_batched(q, k, v, len(lengths), scale)
    outs = [
        F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in parts), scale=scale)[0]
        for parts in zip(*(torch.split(t, lengths) for t in (q, k, v)), strict=True)
    ]
    return torch.cat(outs, dim=1).transpose(0, 1)


def _sdpa_batched(q, k, v, images: int, scale: float):
    """One SDPA call over (images, heads, patches, dim) views of images with as many patches each.

    On Hopper torch picks cuDNN's attention for it; the views keep the tokens' (patches, heads, dim)
    layout, which cuDNN and flash read as it is (no copy).
    """
    import torch.nn.functional as F

    tokens, heads, dim = q.shape
    batched = [t.reshape(images, tokens // images, heads, dim).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*batched, scale=scale)  # (images, heads, patches, dim)
    return out.transpose(1, 2).reshape(tokens, heads, dim)


def vision_configs(model) -> list:
    """The vision configs of a (possibly PEFT-wrapped) Qwen2-VL model: the config its vision blocks read."""
    return attention_configs(model, vision=True)


def attention_configs(model, vision: bool) -> list:
    """The distinct configs that `model`'s attention modules read their implementation from: the vision
    tower's (vision) or the LLM's (its attention modules group query heads: `num_key_value_groups`)."""
    found = []
    for module in model.modules():
        config = getattr(module, "config", None)
        is_vision = type(module).__name__.endswith("VisionAttention")
        wanted = is_vision if vision else not is_vision and hasattr(module, "num_key_value_groups")
        if wanted and config is not None and not any(config is seen for seen in found):
            found.append(config)
    return found


def use_varlen_vision_attention(model, batch_equal_images: bool = True) -> bool:
    """Route `model`'s vision attention through `varlen_vision_attention`; returns whether it found one.

    `batch_equal_images`: a batch whose images all have one size goes to one batched SDPA call; False
    keeps every batch on the varlen kernel (the bench's `fast+compile-batched` row).
    Only the vision config changes (through its `_attn_implementation` setter, as transformers' own
    `set_attn_implementation` does); the LLM's attention and the saved config stay as loaded.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_vision_attention)
    AttentionInterface.register(
        VARLEN_ONLY_ATTENTION, functools.partial(varlen_vision_attention, batch_equal_images=False)
    )
    name = VARLEN_ATTENTION if batch_equal_images else VARLEN_ONLY_ATTENTION
    configs = vision_configs(model)
    for config in configs:
        config._attn_implementation = name
    if configs:
        how = "batched when the images share one size, else varlen" if batch_equal_images else "varlen"
        log.info("vision attention: one call a block, %s (%s)", how, name)
    return bool(configs)
