"""Positions worked out on the host (src/training/host_positions.py) on the tiny model: the M-RoPE
positions put in the batch are the model's own, the vision tower gets CPU boundaries, and a training
step gives the same loss and LoRA gradients as the model computing them itself. On a GPU, the
forward reads far fewer values back from the device."""

import copy
import pickle

import pytest
import torch

from src.models.loader import model_family
from src.recipes import resolve_recipe
from src.training.host_positions import (
    RopePositions,
    add_rope_positions,
    language_backbone,
    vision_lengths_on_host,
)
from src.training.run import load_wrapped_model
from tests.conftest import exact_lora, loss_and_grads, tiny_batch, tiny_qwen2_5_vl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir, tiny_data_dir):
    """r4 on the tiny model (dropout off, lora_B non-zero so every LoRA weight gets a gradient) and a
    collated batch of three samples, padded to different lengths."""
    model_dir = str(tiny_model_dir)
    torch.manual_seed(0)
    model, _ = load_wrapped_model(resolve_recipe("r4"), model_dir, "cpu", model_family(model_dir))
    model.config.use_cache = False
    exact_lora(model)
    return model, tiny_batch(tiny_model_dir, tiny_data_dir, "cpu")


def test_rope_positions_are_the_models_own_and_survive_pickling(model_and_batch):
    model, batch = model_and_batch
    batch = dict(batch)
    assert add_rope_positions(model, batch)
    expected, _ = language_backbone(model).get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
    assert torch.equal(batch["position_ids"], expected)
    assert not add_rope_positions(model, batch), "a batch with positions is left as it is"

    # The collator's copy goes to the loader's worker processes: it must pickle, and work alone.
    positions = pickle.loads(pickle.dumps(RopePositions.of(language_backbone(model))))
    fresh = {k: v for k, v in batch.items() if k != "position_ids"}
    assert positions(fresh) and torch.equal(fresh["position_ids"], expected)


def test_a_step_with_host_positions_gives_the_same_loss_and_gradients(model_and_batch):
    model, batch = model_and_batch
    reference = copy.deepcopy(model)
    loss_model, grads_model = loss_and_grads(reference, dict(batch))

    seen = []
    tower = next(m for n, m in model.named_modules() if n.endswith("visual"))
    first_block = tower.blocks[0]
    hook = first_block.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["cu_seqlens"].device.type), with_kwargs=True
    )
    try:
        assert vision_lengths_on_host(model)
        host_batch = dict(batch)
        assert add_rope_positions(model, host_batch)
        loss_host, grads_host = loss_and_grads(model, host_batch)
    finally:
        hook.remove()

    assert seen and set(seen) == {"cpu"}, "the vision blocks got the image boundaries as a CPU tensor"
    assert loss_host == pytest.approx(loss_model, rel=0, abs=1e-6)
    assert grads_host.keys() == grads_model.keys() and len(grads_host) > 0
    for name, grad in grads_model.items():
        torch.testing.assert_close(grads_host[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_forward_reads_back_far_less(model_and_batch):
    import warnings

    model, batch = model_and_batch
    model = copy.deepcopy(model).cuda()

    def count_syncs(batch_on_host: dict) -> int:
        on_gpu = {k: v.cuda() for k, v in batch_on_host.items()}
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(**on_gpu)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(r.message) for r in records)

    before = count_syncs(dict(batch))
    vision_lengths_on_host(model)
    host_batch = dict(batch)
    add_rope_positions(model, host_batch)
    after = count_syncs(host_batch)
    assert after < before / 3, (before, after)


def test_training_with_host_positions_feeds_the_model_its_positions(tiny_model_dir, tiny_data_dir, tmp_path):
    from src.training.run import prepare_stage
    from tests.conftest import tiny_run_options

    stage = resolve_recipe("r4")
    opts = tiny_run_options(tiny_model_dir, tiny_data_dir, tmp_path, max_steps=2, host_positions=True)
    prepared = prepare_stage(stage.name, stage, opts.model_id, opts, tmp_path)
    seen = []
    hook = prepared.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True
    )
    try:
        prepared.trainer.train()
    finally:
        hook.remove()
    assert len(seen) == 2 and all(p is not None and p.shape[0] == 3 for p in seen)
    assert prepared.trainer.state.global_step == 2


def test_qwen2_5_vl_gets_its_own_positions_too():
    """Compiled runs work positions out on the host by default, for either family."""
    backbone = language_backbone(tiny_qwen2_5_vl())
    config = backbone.config
    image = [config.vision_start_token_id] + [config.image_token_id] * 6  # a 1x4x6 grid, merged 2x2
    input_ids = torch.tensor([[1, 2, *image, 3], [1, *image, 3, 4]])
    batch = {
        "input_ids": input_ids,
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
        "image_grid_thw": torch.tensor([[1, 4, 6], [1, 4, 6]]),
        "attention_mask": torch.ones_like(input_ids),
    }
    expected, _ = backbone.get_rope_index(**batch)
    assert RopePositions.of(backbone)(batch)
    assert torch.equal(batch["position_ids"], expected)
