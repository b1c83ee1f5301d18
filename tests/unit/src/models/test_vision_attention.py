"""The vision tower's attention as one call a block (src/models/vision_attention.py), on the tiny model:
the same outputs and gradients as the model's own per-image SDPA loop, for images of one size (one
batched SDPA call, told by shapes alone) and of several sizes (one call each on the CPU); only the vision
config changes, and nothing of it is saved. On a GPU (marked `gpu`): torch's flash varlen kernel (mixed
sizes) and the batched call (one size) match SDPA within bf16 rounding and read nothing back from the GPU."""

import json

import pytest
import torch

from src.models.loader import load_model
from src.models.vision_attention import (
    VARLEN_ATTENTION,
    VARLEN_ONLY_ATTENTION,
    equal_images,
    flash_varlen_usable,
    use_varlen_vision_attention,
    varlen_vision_attention,
    vision_configs,
)
from tests.tiny_models import tiny_qwen3_vl

pytestmark = pytest.mark.slow
SAME_SIZE = [[1, 4, 6], [1, 4, 6], [1, 4, 6]]
MIXED_SIZES = [[1, 4, 6], [1, 6, 8], [1, 2, 4]]


def _pixels(grid, visual, device, dtype):
    """Random patches for images of `grid` (t, h, w), in the layout the processor gives the tower."""
    config = visual.config
    width = config.in_channels * config.temporal_patch_size * config.patch_size**2
    patches = sum(t * h * w for t, h, w in grid)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(patches, width, generator=generator).to(device=device, dtype=dtype)
    return pixels, torch.tensor(grid, device=device)


def _tower_run(visual, grid, device="cpu", dtype=torch.float32):
    """The tower's patch and merged outputs, and every parameter's gradient of their sum."""
    visual.zero_grad(set_to_none=True)
    pixels, grid_thw = _pixels(grid, visual, device, dtype)
    out = visual(pixels, grid_thw=grid_thw)
    (out.last_hidden_state.float().sum() + out.pooler_output.float().sum()).backward()
    grads = {n: p.grad.float().clone() for n, p in visual.named_parameters() if p.grad is not None}
    return out.last_hidden_state.detach().float(), out.pooler_output.detach().float(), grads


def _own_then_varlen(model, grid, device="cpu", dtype=torch.float32):
    visual = model.model.visual
    for config in vision_configs(model):
        config._attn_implementation = "sdpa"
    own = _tower_run(visual, grid, device, dtype)
    assert use_varlen_vision_attention(model)
    return own, _tower_run(visual, grid, device, dtype)


def _assert_close(own, varlen, atol, rtol):
    for expected, got in zip(own[:2], varlen[:2], strict=True):
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    assert own[2].keys() == varlen[2].keys() and len(own[2]) > 0
    for name, grad in own[2].items():
        torch.testing.assert_close(varlen[2][name], grad, atol=atol, rtol=rtol, msg=name)


@pytest.fixture
def cpu_model(tiny_model_dir):
    return load_model(str(tiny_model_dir), "cpu")


def _count_calls(monkeypatch, *names) -> dict:
    """Count the calls of vision_attention's functions `names` (they still run)."""
    import src.models.vision_attention as vision_attention

    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(vision_attention, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(vision_attention, name, counted)
    return calls


@pytest.mark.parametrize(
    "grid, path",
    [(SAME_SIZE, "_sdpa_batched"), (MIXED_SIZES, "_sdpa_per_image")],
    ids=["one-size", "mixed-sizes"],
)
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_same_outputs_and_gradients_as_the_models_own_attention(cpu_model, family, grid, path, monkeypatch):
    """Qwen3-VL's tower (patch 16, learned positions, DeepStack) takes the same one-call-a-block path."""
    model = cpu_model if family == "qwen2_vl" else tiny_qwen3_vl()
    calls = _count_calls(monkeypatch, "_sdpa_batched", "_sdpa_per_image")
    own, varlen = _own_then_varlen(model, grid)
    assert calls[path] == model.config.vision_config.depth  # one call a block, all images in it
    assert sum(calls.values()) == calls[path]
    _assert_close(own, varlen, atol=1e-5, rtol=1e-5)


def test_images_of_one_size_are_told_by_shapes_alone():
    cu = torch.tensor([0, 6, 12, 18])  # 3 images
    assert equal_images(18, cu, max_seqlen=6) == 3
    assert equal_images(16, cu, max_seqlen=6) is None  # 16 tokens: at least one image is smaller
    assert equal_images(18, cu, max_seqlen=None) is None
    assert equal_images(0, torch.tensor([0]), max_seqlen=0) is None


def test_batching_equal_images_can_be_turned_off(cpu_model, monkeypatch):
    calls = _count_calls(monkeypatch, "_sdpa_batched", "_sdpa_per_image")
    assert use_varlen_vision_attention(cpu_model, batch_equal_images=False)
    assert cpu_model.config.vision_config._attn_implementation == VARLEN_ONLY_ATTENTION
    _tower_run(cpu_model.model.visual, SAME_SIZE)
    # the CPU's per-image fallback then batches after reading the lengths: once a block, never directly
    assert calls["_sdpa_per_image"] == cpu_model.config.vision_config.depth
    assert calls["_sdpa_batched"] == calls["_sdpa_per_image"]


def test_only_the_vision_config_changes_and_none_of_it_is_saved(cpu_model, tmp_path):
    assert use_varlen_vision_attention(cpu_model)
    config = cpu_model.config
    assert config.vision_config._attn_implementation == VARLEN_ATTENTION
    assert config.text_config._attn_implementation == "sdpa"
    assert config._attn_implementation == "sdpa"
    cpu_model.config.save_pretrained(tmp_path)
    assert VARLEN_ATTENTION not in (tmp_path / "config.json").read_text()
    json.loads((tmp_path / "config.json").read_text())


def test_refuses_what_vision_attention_never_has():
    q = torch.zeros(1, 2, 6, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="vision tower only"):
        varlen_vision_attention(None, q, q, q, attention_mask=torch.ones(1, 1, 6, 6), cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="vision tower only"):
        varlen_vision_attention(None, q, q, q)  # no image boundaries


def test_the_cpu_takes_the_sdpa_path():
    assert not flash_varlen_usable(torch.zeros(4, 2, 8), 8**-0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("grid", [SAME_SIZE, MIXED_SIZES], ids=["one-size", "mixed-sizes"])
def test_flash_varlen_on_cuda_matches_sdpa_and_reads_nothing_back(tiny_model_dir, grid):
    model = load_model(str(tiny_model_dir), "cuda")
    heads = model.config.vision_config.num_heads
    head_dim = model.config.vision_config.embed_dim // heads
    assert flash_varlen_usable(
        torch.zeros(4, heads, head_dim, device="cuda", dtype=torch.bfloat16), head_dim**-0.5
    )
    own, varlen = _own_then_varlen(model, grid, "cuda", torch.bfloat16)
    _assert_close(own, varlen, atol=3e-2, rtol=3e-2)

    q = torch.randn(1, heads, 40, head_dim, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 16, 40], device="cuda", dtype=torch.int32)
    one_size = cu.new_tensor([0, 20, 40])  # two images of 20 patches: the batched SDPA call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any read back from the GPU raises
    try:
        out, _ = varlen_vision_attention(None, q, q, q, cu_seq_lens_q=cu, max_length_q=24)
        batched, _ = varlen_vision_attention(None, q, q, q, cu_seq_lens_q=one_size, max_length_q=20)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == batched.shape == (1, 40, heads, head_dim)
