"""Regional compilation on the tiny model (CPU, the aot_eager backend: the same traced forward and
backward graphs as inductor, without generating code, so it stays quick on two cores).

Every decoder layer and vision block is compiled in place and nothing else; parameter names stay;
a compiled step gives the eager step's loss and LoRA gradients; new image sizes do not recompile,
and a new micro-batch size recompiles a bounded number of times, once. QLoRA's 4-bit decoder
layers are left eager.
"""

import copy

import pytest
import torch

from src.models.loader import load_processor, model_family
from src.recipes import resolve_recipe
from src.training.compile import compile_regions, compile_report, find_regions, reset_compile_state
from src.training.run import load_wrapped_model
from tests.conftest import exact_lora, loss_and_grads

pytestmark = pytest.mark.slow
BACKEND = "aot_eager"


def _load(tiny_model_dir, recipe: str):
    model_dir = str(tiny_model_dir)
    model, _ = load_wrapped_model(resolve_recipe(recipe), model_dir, "cpu", model_family(model_dir))
    model.config.use_cache = False  # training never caches keys and values (the trainer sets this too)
    return model


def _region_count(model) -> int:
    text, vision = model.config.text_config, model.config.vision_config
    return text.num_hidden_layers + vision.depth


@pytest.fixture(scope="module")
def eager_and_compiled(tiny_model_dir):
    """r4 (LoRA on vision and LLM) eager, and a copy of it compiled; dropout off so both are exact."""
    reset_compile_state()
    torch.manual_seed(0)
    eager = exact_lora(_load(tiny_model_dir, "r4"))
    eager.train()
    compiled = copy.deepcopy(eager)
    keys_before = list(compiled.state_dict())
    count = compile_regions(compiled, backend=BACKEND)
    return eager, compiled, count, keys_before


def _batch(processor, dataset, size: tuple[int, int], batch_size: int) -> dict:
    """A training batch whose images are resized to `size` (width, height)."""
    from PIL import Image

    from src.data.collators import AssistantOnlyCollator

    rows = []
    for index in range(batch_size):
        row = dict(dataset[index])
        with Image.open(row["images"][0]) as image:
            row["images"] = [image.convert("RGB").resize(size)]
        rows.append(row)
    return AssistantOnlyCollator(processor)(rows)


@pytest.fixture(scope="module")
def train_rows(tiny_model_dir, tiny_data_dir):
    from src.data.dataset import build_dataset

    processor = load_processor(str(tiny_model_dir))
    dataset, _ = build_dataset(str(tiny_data_dir), "train", model_family(str(tiny_model_dir)), processor)
    return processor, dataset


def test_every_decoder_layer_and_vision_block_is_compiled_in_place(eager_and_compiled):
    _, compiled, count, keys_before = eager_and_compiled
    regions = [layer for layers in find_regions(compiled).values() for layer in layers]
    assert count == len(regions) == _region_count(compiled)
    assert all(layer._compiled_call_impl is not None for layer in regions)
    others = [m for m in compiled.modules() if m._compiled_call_impl is not None and m not in regions]
    assert others == []  # the glue between regions (embeddings, M-RoPE, the head) stays eager
    assert list(compiled.state_dict()) == keys_before  # PEFT saves and merges by these names


def test_compiled_step_gives_the_eager_loss_and_lora_gradients(eager_and_compiled, train_rows):
    eager, compiled, _, _ = eager_and_compiled
    batch = _batch(*train_rows, size=(112, 84), batch_size=2)
    eager_loss, eager_grads = loss_and_grads(eager, batch)
    compiled_loss, compiled_grads = loss_and_grads(compiled, batch)
    assert compile_report()["frames_compiled"] > 0  # the compiled path really ran
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    lora = [n for n in eager_grads if "lora_" in n]
    assert lora and sorted(compiled_grads) == sorted(eager_grads)
    for name in lora:
        assert eager_grads[name].abs().sum() > 0, name
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6)


def test_new_image_sizes_reuse_the_compiled_code_and_a_new_batch_size_compiles_once(
    eager_and_compiled, train_rows
):
    _, compiled, _, _ = eager_and_compiled
    loss_and_grads(compiled, _batch(*train_rows, size=(112, 84), batch_size=2))  # compiled (or already so)
    frames = compile_report()["frames_compiled"]
    for size in ((140, 112), (84, 168)):  # other image sizes: other patch counts and sequence lengths
        loss_and_grads(compiled, _batch(*train_rows, size=size, batch_size=2))
    assert compile_report()["frames_compiled"] == frames
    loss_and_grads(compiled, _batch(*train_rows, size=(112, 84), batch_size=3))  # a new micro-batch size
    after_new_batch = compile_report()["frames_compiled"]
    assert after_new_batch - frames <= 4  # the vision attention's per-image loop: a few frames, once
    for size in ((140, 112), (112, 84)):
        loss_and_grads(compiled, _batch(*train_rows, size=size, batch_size=3))
    assert compile_report()["frames_compiled"] == after_new_batch


def test_qlora_decoder_layers_stay_eager_and_the_vision_tower_is_compiled(tiny_model_dir, caplog):
    model = _load(tiny_model_dir, "r1")
    with caplog.at_level("INFO", logger="src.training.compile"):
        count = compile_regions(model, backend=BACKEND)
    regions = find_regions(model)
    assert count == len(regions["vision block"]) == model.config.vision_config.depth
    assert all(layer._compiled_call_impl is None for layer in regions["decoder layer"])
    assert "4-bit" in caplog.text


def test_qlora_decoder_layers_compile_too_when_asked(tiny_model_dir):
    model = _load(tiny_model_dir, "r1")
    count = compile_regions(model, backend=BACKEND, include_quantized=True)
    regions = find_regions(model)
    assert count == len(regions["vision block"]) + len(regions["decoder layer"])
    assert all(layer._compiled_call_impl is not None for layer in regions["decoder layer"])
