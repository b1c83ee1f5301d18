"""Activation offloading (src/training/offload.py) on the tiny model with recompute on: every tensor a
training forward saves for backward makes the round trip through the hooks (on the CPU, "cpu" is added
to the devices, so the round trip is a copy), backward's unpacks copy the next tensor back ahead
(prefetch), and no loss or gradient changes; evaluation forwards and anything after the forward are
left alone. On a GPU (marked `gpu`), with the copies on a side stream (prefetched) and on the compute
stream (not): the saved tensors wait in pinned host memory and the step's peak GPU memory falls."""

import pytest
import torch

from src.recipes import resolve_recipe
from src.training.offload import ActivationOffload, offload_activations
from src.training.run import load_wrapped_model
from tests.conftest import exact_lora, loss_and_grads, tiny_batch

pytestmark = pytest.mark.slow


def _model(tiny_model_dir, device: str):
    model_dir = str(tiny_model_dir)
    torch.manual_seed(0)
    model, _ = load_wrapped_model(resolve_recipe("r4"), model_dir, device, "qwen2_vl")
    exact_lora(model)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


@pytest.mark.parametrize("streams", [True, False])
def test_saved_tensors_round_trip_and_nothing_changes(tiny_model_dir, tiny_data_dir, streams):
    model = _model(tiny_model_dir, "cpu")
    batch = tiny_batch(tiny_model_dir, tiny_data_dir, "cpu")
    loss, grads = loss_and_grads(model, batch)
    offload = offload_activations(model, ActivationOffload(min_bytes=0, devices=("cpu",), streams=streams))
    offloaded_loss, offloaded_grads = loss_and_grads(model, batch)
    layers = model.config.text_config.num_hidden_layers + model.config.vision_config.depth
    assert offload.offloaded >= layers  # at least each checkpointed block's input
    if streams:  # each block's input was copied back while the one after ran
        assert offload.prefetched >= layers - 1
    else:  # the first version's way: each copied back when backward asks for it
        assert offload.prefetched == 0
    assert offloaded_loss == loss and offloaded_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(offloaded_grads[name], grad, msg=name)


def test_evaluation_forwards_and_what_follows_a_forward_are_left_alone(tiny_model_dir, tiny_data_dir):
    model = _model(tiny_model_dir, "cpu")
    batch = tiny_batch(tiny_model_dir, tiny_data_dir, "cpu")
    offload = offload_activations(model, ActivationOffload(min_bytes=0, devices=("cpu",)))
    with torch.no_grad():
        model(**batch)
    model.eval()
    model(**batch)
    assert offload.offloaded == 0
    model.train()
    model(**batch)
    after_forward = offload.offloaded
    assert after_forward > 0
    x = torch.randn(4, requires_grad=True)
    (x * x).sum().backward()  # saves x: the hooks must be gone once the forward returned
    assert offload.offloaded == after_forward


@pytest.mark.gpu
@pytest.mark.parametrize("streams", [True, False])
def test_on_cuda_saved_tensors_wait_on_the_host_and_the_peak_falls(tiny_model_dir, tiny_data_dir, streams):
    model = _model(tiny_model_dir, "cuda")
    batch = tiny_batch(tiny_model_dir, tiny_data_dir, "cuda")

    def peak_step():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = loss_and_grads(model, batch)
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base

    (loss, grads), peak = peak_step()
    offload = offload_activations(model, ActivationOffload(min_bytes=0, streams=streams))
    (offloaded_loss, offloaded_grads), offloaded_peak = peak_step()
    assert offload.offloaded > 0 and offload.offloaded_bytes > 0
    assert (offload.prefetched > 0) == streams  # one stream: nothing to overlap, so no prefetch
    assert offloaded_peak < peak
    assert offloaded_loss == pytest.approx(loss, rel=1e-3)
    for name, grad in grads.items():
        torch.testing.assert_close(offloaded_grads[name], grad, atol=2e-2, rtol=2e-2, msg=name)
