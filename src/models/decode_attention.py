"""The LLM's attention at a decoding step with its query heads grouped onto their key/value heads.

Qwen2-VL's LLM has 7 query heads for each key/value head (28 and 4 at 7B; grouped-query attention).
transformers' SDPA function lets torch handle the grouping only when no mask is given; a batch of
left-padded prompts (images of several sizes in one generate() call) and every static KV cache pass a mask,
and then it copies each key/value head 7 times (`repeat_kv`) before the attention call, in every layer at
every decoding step. Measured on an H100 (7B, 256 images of COCO's sizes, docs/benchmarks.md, thirteenth
session): 3,584 copies of about 1 ms in 64 steps, and a decoding step of 95 ms that takes 26.6 ms without
them.

`packed_decode_attention` takes the one-token query (batch, heads, 1, dim), views it as (batch, kv_heads,
group, dim) and makes one SDPA call against the cache as it is: the group's queries become the query
positions of their key/value head, and the padding mask (batch, 1, 1, keys) broadcasts over them. The same
arithmetic as the model's own call (tests/unit/src/models/test_decode_attention.py); anything else (the
prefill, training, modules without grouped heads) goes to transformers' SDPA function unchanged.

    from src.models.decode_attention import use_packed_decode_attention
    use_packed_decode_attention(model)        # an evaluation model, after loading

Newer transformers do the same inside their SDPA function; this keeps the versions we run on (5.17 on the
GPU image) from paying the copies.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PACKED_ATTENTION = "recipe_runner_sdpa_packed_decode"


def packed_decode_attention(module, query, key, value, attention_mask=None, **kwargs):
    """transformers' attention-function signature: (batch, heads, q_len, dim) query, (batch, kv_heads,
    keys, dim) key and value in; (batch, q_len, heads, dim) out, and no attention weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if not _packable(query, attention_mask, groups, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    import torch.nn.functional as F

    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, heads // groups, groups, dim)  # head h reads key/value head h // groups
    out = F.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, scale=kwargs.get("scaling")
    )
    return out.reshape(batch, 1, heads, dim), None


def _packable(query, attention_mask, groups: int, kwargs: dict) -> bool:
    """A one-token query of grouped heads, a mask shared by all heads (or none), nothing else asked."""
    if groups <= 1 or query.shape[2] != 1 or kwargs.get("dropout"):
        return False
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return False
    return attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)


def text_configs(model) -> list:
    """The configs the LLM's attention layers read (one per model; the vision tower's are left alone)."""
    from src.models.vision_attention import attention_configs

    return attention_configs(model, vision=False)


def use_packed_decode_attention(model, on: bool = True) -> bool:
    """Route `model`'s LLM attention through `packed_decode_attention` (on) or back to SDPA (off).

    Registers the function and SDPA's mask under PACKED_ATTENTION with transformers' AttentionInterface and
    AttentionMaskInterface, and sets that name on the LLM's config only; returns whether one was found.
    A model loaded with another implementation than SDPA (eager, flash) is left as it is.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    wanted, current = (PACKED_ATTENTION, "sdpa") if on else ("sdpa", PACKED_ATTENTION)
    configs = [c for c in text_configs(model) if c._attn_implementation in (current, wanted)]
    if any(c._attn_implementation == current for c in configs):  # said once, not every batch
        how = "query heads grouped onto their key/value heads" if on else "the model's SDPA"
        log.info("LLM attention at decoding steps: %s", how)
    for config in configs:
        config._attn_implementation = wanted
    return bool(configs)
