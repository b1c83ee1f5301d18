"""The LLM's decoding-step attention with query heads grouped onto their key/value heads
(src/models/decode_attention.py): the same numbers as transformers' SDPA function with and without a
padding mask, other calls passed through untouched, only the LLM's config switched, and the tiny model's
greedy answers on left-padded batches of mixed image sizes unchanged (evaluation's fast attention), with the
dynamic and the static cache.
"""

import pytest
import torch
from PIL import Image
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from src.data.dataset import load_records
from src.data.records import DetectionRecord
from src.eval.predict import load_for_eval, predict_records
from src.models.decode_attention import (
    PACKED_ATTENTION,
    packed_decode_attention,
    text_configs,
    use_packed_decode_attention,
)
from src.models.vision_attention import vision_configs


class _Grouped(torch.nn.Module):
    """What the attention functions read off a layer: its head grouping (7 query heads a key/value head)."""

    num_key_value_groups = 7
    is_causal = True
    training = False


def _qkv(batch=3, kv_heads=2, q_len=1, keys=11, dim=16):
    generator = torch.Generator().manual_seed(0)
    heads = kv_heads * _Grouped.num_key_value_groups
    query = torch.randn(batch, heads, q_len, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, keys, dim, generator=generator) for _ in range(2))
    return query, key, value


def _left_padding(batch=3, keys=11):
    mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
    mask[1, ..., :4] = False  # a shorter prompt, padded on the left
    mask[2, ..., :7] = False
    return mask


@pytest.mark.parametrize("mask", [None, _left_padding()], ids=["no-mask", "left-padded"])
def test_one_token_query_matches_sdpa(mask):
    query, key, value = _qkv()
    expected, _ = sdpa_attention_forward(_Grouped(), query, key, value, mask, scaling=0.25)
    got, weights = packed_decode_attention(_Grouped(), query, key, value, mask, scaling=0.25)
    assert weights is None and got.shape == expected.shape == (3, 1, 14, 16)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_a_prefill_goes_to_sdpa_unchanged(monkeypatch):
    from src.models import decode_attention

    calls = []

    def recorded(module, query, key, value, mask, **kwargs):
        calls.append(query.shape)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr("transformers.integrations.sdpa_attention.sdpa_attention_forward", recorded)
    query, key, value = _qkv(q_len=11)
    decode_attention.packed_decode_attention(_Grouped(), query, key, value, None, scaling=0.25)
    assert calls == [query.shape]


@pytest.fixture(scope="module")
def eval_model(tiny_model_dir):
    model, processor, family = load_for_eval(str(tiny_model_dir), "cpu")
    yield model, processor, family
    use_packed_decode_attention(model, on=False)


def test_only_the_llm_config_is_switched_and_back(eval_model):
    model = eval_model[0]
    vision = [c._attn_implementation for c in vision_configs(model)]
    assert use_packed_decode_attention(model)
    assert [c._attn_implementation for c in text_configs(model)] == [PACKED_ATTENTION]
    assert [c._attn_implementation for c in vision_configs(model)] == vision
    assert use_packed_decode_attention(model, on=False)
    assert [c._attn_implementation for c in text_configs(model)] == ["sdpa"]


@pytest.mark.parametrize("decode", ["plain", "static"])
def test_greedy_answers_on_left_padded_mixed_sizes_are_unchanged(
    eval_model, tiny_data_dir, decode, monkeypatch
):
    from src.models import decode_attention

    model, processor, family = eval_model
    test = load_records(str(tiny_data_dir), "test")[0]
    small = Image.open(test[1].image).convert("RGB").resize((56, 84))
    records = [test[0], DetectionRecord(small, 56, 84, [], "small"), test[2]]  # prompts of two lengths
    run = dict(family=family, device="cpu", batch_size=3, max_new_tokens=12, decode=decode)
    expected = [p.text for p in predict_records(model, processor, records, **run, fast_attention=False)]
    grouped = []
    packable = decode_attention._packable
    monkeypatch.setattr(decode_attention, "_packable", lambda *a: grouped.append(packable(*a)) or grouped[-1])
    assert [
        p.text for p in predict_records(model, processor, records, **run, fast_attention=True)
    ] == expected
    assert (
        grouped.count(True) == 11 * text_configs(model)[0].num_hidden_layers
    )  # every decoding step's layers
    assert grouped.count(False) == text_configs(model)[0].num_hidden_layers  # the prefill


@pytest.mark.gpu
@pytest.mark.parametrize("mask", [None, "left-padded"])
def test_bf16_decoding_step_on_cuda_matches_sdpa_at_the_7b_shape(mask):
    # The 7B LLM's heads (28 query, 4 key/value, dim 128), 64 prompts of up to 520 tokens.
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, keys = 64, 520

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda", dtype=torch.bfloat16)

    query, key, value = randn(batch, 28, 1, 128), randn(batch, 4, keys, 128), randn(batch, 4, keys, 128)
    padding = None
    if mask:
        lengths = torch.randint(300, keys + 1, (batch,), generator=generator, device="cuda")
        padding = (torch.arange(keys, device="cuda") >= keys - lengths[:, None]).view(batch, 1, 1, keys)
    expected, _ = sdpa_attention_forward(_Grouped(), query, key, value, padding, scaling=128**-0.5)
    got, _ = packed_decode_attention(_Grouped(), query, key, value, padding, scaling=128**-0.5)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_fast_attention_on_cuda_answers_as_the_models_own(tiny_model_dir, tiny_data_dir):
    model, processor, family = load_for_eval(str(tiny_model_dir), "cuda")
    test = load_records(str(tiny_data_dir), "test")[0][:6]
    small = Image.open(test[1].image).convert("RGB").resize((56, 84))
    records = [*test, DetectionRecord(small, 56, 84, [], "small")]
    run = dict(family=family, device="cuda", batch_size=len(records), max_new_tokens=16)
    own = predict_records(model, processor, records, **run, fast_attention=False)
    fast = predict_records(model, processor, records, **run, fast_attention=True)
    # Other bf16 kernels (flash varlen in the tower, one SDPA call a layer) may break one near-tie of
    # a random model's logits differently; the arithmetic itself is checked by the test above.
    same = sum(a.text == b.text for a, b in zip(own, fast, strict=True))
    assert same >= len(records) - 1, [(a.text, b.text) for a, b in zip(own, fast, strict=True)]
