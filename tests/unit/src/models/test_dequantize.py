"""QLoRA with its 4-bit weights dequantized once (src/models/dequantize.py), on the tiny model.

On the CPU: a step with the copies (fp32 there, the CPU's compute dtype) gives the loss and LoRA gradients
of bitsandbytes' own path; the copies are never saved (not in a state_dict, not in the adapter); the
layers then compile like any other; the worker keeps them only for 4-bit stages, as asked (auto: on GPUs,
where they fit; the planner's rule is tested in test_planner.py). On a GPU (marked `gpu`): the same in
bf16, and the copies take the memory they claim.
"""

import pytest
import torch

from src.models.dequantize import BUFFER, cache_dequantized_weights, is_dequantized
from src.recipes import resolve_recipe
from src.training.levers import resolve_dequantized
from src.training.options import RunOptions
from src.training.run import load_wrapped_model
from tests.conftest import exact_lora, loss_and_grads, tiny_batch

pytestmark = pytest.mark.slow


def _model(tiny_model_dir, device: str):
    torch.manual_seed(0)
    model, _ = load_wrapped_model(resolve_recipe("r1"), str(tiny_model_dir), device, "qwen2_vl")
    exact_lora(model)
    model.config.use_cache = False
    model.train()
    return model


def _linear4bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_dequantized_once_gives_bitsandbytes_loss_and_gradients(tiny_model_dir, tiny_data_dir):
    model = _model(tiny_model_dir, "cpu")
    batch = tiny_batch(tiny_model_dir, tiny_data_dir, "cpu")
    loss, grads = loss_and_grads(model, batch)
    layers = _linear4bit_layers(model)
    cached = cache_dequantized_weights(model)
    assert layers and cached == sum(getattr(m, BUFFER).numel() * 4 for m in layers)  # fp32 on the CPU
    cached_loss, cached_grads = loss_and_grads(model, batch)
    assert cached_loss == pytest.approx(loss, rel=1e-5)
    assert cached_grads.keys() == grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert cache_dequantized_weights(model) == 0  # a second call finds every layer done


def test_the_copies_are_never_saved_and_the_4bit_weights_stay(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir, "cpu")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    cache_dequantized_weights(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and not any(BUFFER in name for name in after)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)


def test_dequantized_decoder_layers_compile_with_the_vision_blocks(tiny_model_dir):
    from src.training.compile import compile_regions, find_regions, reset_compile_state

    reset_compile_state()
    model = _model(tiny_model_dir, "cpu")
    regions = find_regions(model)
    assert not any(is_dequantized(layer) for layer in regions["decoder layer"])
    cache_dequantized_weights(model)
    assert all(is_dequantized(layer) for layer in regions["decoder layer"])
    assert not is_dequantized(regions["vision block"][0])  # no 4-bit layer there
    count = compile_regions(model, backend="aot_eager")
    assert count == len(regions["decoder layer"]) + len(regions["vision block"])


@pytest.mark.parametrize(
    "recipe, device, asked, wanted",
    [
        ("r1", "cpu", True, True),  # as asked, wherever
        ("r1", "cuda", False, False),
        ("r1", "cpu", None, False),  # auto: never on the CPU
        ("r4", "cuda", True, False),  # a bf16 stage has nothing to dequantize
    ],
)
def test_the_worker_dequantizes_4bit_stages_as_asked_and_never_bf16_ones(
    recipe, device, asked, wanted, tmp_path
):
    opts = RunOptions("m", "d", tmp_path, device=device, dequantize_once=asked)

    def planner_inputs():
        pytest.fail("these cases are decided without asking the planner")

    assert resolve_dequantized(resolve_recipe(recipe), opts, planner_inputs, False) is wanted


@pytest.mark.parametrize("flag, expected", [("auto", None), ("on", True), ("off", False)])
def test_dequantize_once_flag_reaches_the_run_options(flag, expected, tmp_path):
    from src.training.worker import build_parser, run_options

    args = build_parser().parse_args(["--recipe", "r1", "--dequantize-once", flag])
    assert run_options(args, "cuda", tmp_path, wandb_on=False).dequantize_once is expected


@pytest.mark.gpu
def test_on_cuda_bf16_copies_match_bitsandbytes_and_hold_the_planned_bytes(tiny_model_dir, tiny_data_dir):
    model = _model(tiny_model_dir, "cuda")
    batch = tiny_batch(tiny_model_dir, tiny_data_dir, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batch)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    cached = cache_dequantized_weights(model)
    assert torch.cuda.memory_allocated() - allocated >= cached > 0
    assert {getattr(m, BUFFER).dtype for m in _linear4bit_layers(model)} == {torch.bfloat16}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cached_loss, cached_grads = loss_and_grads(model, batch)
    assert cached_loss == pytest.approx(loss, rel=1e-3)
    for name, grad in grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=2e-2, rtol=2e-2, msg=name)
