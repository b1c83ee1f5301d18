"""Positions worked out on the host before a batch goes to the GPU, instead of read back from it.

Qwen2-VL's forward derives positions from the batch with device-to-host reads (`.tolist()`, `.item()`):
its vision attention splits every block's queries by image with `lengths.tolist()` of a GPU tensor, and
its M-RoPE index loops over the rows of GPU tensors. Each read stops the host until the GPU has drained
its queue, so the GPU then idles while the host launches the next kernels: 792 such syncs in two 7B r4
steps (docs/benchmarks.md, "where the core's step time goes"). Both are computed here from the batch's CPU
tensors by the model's own functions, and handed to the model, which then skips computing them:

* `add_rope_positions(model, batch)` puts the model's own `get_rope_index` result in `position_ids`;
* `vision_lengths_on_host(model)` gives the vision tower its `cu_seqlens` as a CPU tensor (one read of
  `grid_thw` per forward instead of one per block).

The results are bit-identical (tests/unit/src/training/test_host_positions.py). `RopePositions(model)` is the
first as a picklable function of a batch alone, for the training collator: it runs in the data loader's worker
processes, ahead of the step, on the CPU tensors the processor made.

On by default when the core compiles (`RunOptions.host_positions`, `run.resolve_host_positions`), off
eager. Eager on one H200 it cut the syncs of two 7B r4 steps from 792 to 117, but the step did not get
measurably faster (cuDNN's attention then spent the time waiting instead). Compiled, 290 of the 353
syncs of two 7B r4 steps were the model's position code; without them the GPU was busy 93.4% of an r4
step instead of 87.0% (r1: 91.1% instead of 86.3%), the step 1% faster (r1: the same), one round each
(docs/benchmarks.md, 2026-12-01 sixth session). The bench's `fast+compile-host-positions` row runs
without it.
"""

from __future__ import annotations

import types


def language_backbone(model):
    """The Qwen2-VL model (the module with `get_rope_index`) inside a PEFT or plain wrapper, or None."""
    for module in model.modules():  # the class that defines it, not a wrapper forwarding attributes
        if any("get_rope_index" in vars(cls) for cls in type(module).__mro__):
            return module
    return None


def add_rope_positions(model, batch: dict) -> bool:
    """Put the M-RoPE `position_ids` of a CPU batch in it, as the model's forward would compute them.

    Returns whether it did: not when the batch is already on the GPU, has positions, or no image.
    """
    backbone = language_backbone(model)
    return backbone is not None and RopePositions.of(backbone)(batch)


class RopePositions:
    """`get_rope_index` of a Qwen2-VL model class, run on a batch's CPU tensors without the model.

    It keeps only the class and its config (small, picklable for loader workers) and calls the class's
    own method on a stand-in that has what the method reads: `config` and `get_vision_position_ids`.
    """

    def __init__(self, model_class, config):
        self.model_class, self.config = model_class, config

    @classmethod
    def of(cls, backbone) -> RopePositions:
        return cls(type(backbone), backbone.config)

    def __call__(self, batch) -> bool:
        input_ids = batch.get("input_ids")
        if input_ids is None or input_ids.device.type != "cpu" or "position_ids" in batch:
            return False
        if batch.get("image_grid_thw") is None or batch.get("mm_token_type_ids") is None:
            return False
        stand_in = types.SimpleNamespace(config=self.config)
        vision_positions = self.model_class.get_vision_position_ids
        stand_in.get_vision_position_ids = types.MethodType(vision_positions, stand_in)
        try:
            position_ids, _ = self.model_class.get_rope_index(
                stand_in,
                input_ids,
                mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch["image_grid_thw"],
                attention_mask=batch.get("attention_mask"),
            )
        except AttributeError:  # a transformers whose method reads more of the model: it computes them
            return False
        batch["position_ids"] = position_ids
        return True


def vision_lengths_on_host(model) -> bool:
    """Hand the vision tower its per-image boundaries (`cu_seqlens`) as a CPU tensor.

    Only for the Qwen2-VL tower (one attention segment per image); Qwen2.5-VL's windowed tower keeps
    its own path. Returns whether the tower was wrapped.
    """
    from transformers.vision_utils import get_vision_cu_seqlens

    from src.models.freeze import vision_tower

    tower = vision_tower(model)
    if type(tower).__name__ != "Qwen2VisionTransformerPretrainedModel":
        return False
    forward = tower.forward

    def forward_with_host_lengths(hidden_states, grid_thw=None, **kwargs):
        if grid_thw is not None and "cu_seqlens" not in kwargs:
            kwargs["cu_seqlens"] = get_vision_cu_seqlens(grid_thw.cpu())  # the one read a forward
        return forward(hidden_states, grid_thw=grid_thw, **kwargs)

    tower.forward = forward_with_host_lengths
    return True
