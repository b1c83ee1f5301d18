"""Step-time cost model: the predicted seconds of one optimizer step, and the settings ranked by it.

Torch-free, like the memory planner it sits on (src/planning/memory.py): `--batch-size auto` (the
launcher's recipe_runner/planning/estimates.py) and the benchmark's candidates (src/bench) run the fastest
setting that fits.

    from src.planning.step_time import rank_settings
    best = rank_settings(shape, recipe, 16, capacity_bytes, image_patches, text_tokens)[0]
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from src.contract.families import vision_trains
from src.planning.memory import DELTA_CHUNK, GIB, HEADROOM, estimate_recipe_memory
from src.planning.parameters import (
    FULL_ATTENTION,
    LINEAR_ATTENTION,
    ModelShape,
    deepstack_params,
    llm_layer_counts,
    lora_targets,
    parameter_counts,
)
from src.recipes import TrainingRecipe

# --- step time: the cost model -------------------------------------------------------------------------
# One micro-batch costs a fixed launch overhead (Python launching a few thousand small kernels) for each
# decoder layer and vision block and for each LoRA-wrapped linear (LLM and tower apart: dropout, two small
# matmuls and the add, forward and backward), plus the FLOPs of the LLM and of the tower at two effective
# rates; recomputation redoes the forward (RECOMPUTE_FACTOR). Eager, fitted 2026-12-07 (eleventh session),
# least squares on relative error, on the eager rows of the current core: 2B r1, r2, r3's stages, r4 at the
# planner's setting and at 4x4 with recompute (one H100, this session), 7B r4 at 8x2 (one H200, 2026-12-01
# fifth session) and at 16x1 with recompute (one H200, 2026-11-30): every row within 8.1%; left out one at a
# time within 13.1% for the 2B rows, 12.9% and 15.4% for the two 7B rows (the only rows of their shape).
# Two shapes and two cards pin five rates loosely: the rates are a fit, not a claim about the GEMMs.
# (The fit of 2026-11-30, one launch cost a region and 350 TFLOP/s, predicted the 2B rows 5-70% slow: it
# was fitted on 7B r4 alone, before the loader and the levers of the current core.)
EAGER_S_PER_REGION = 1.852e-3  # a decoder layer or vision block, forward and backward, one micro-batch
EAGER_S_PER_LORA_LLM = 0.435e-3  # a LoRA-wrapped linear of the LLM
EAGER_S_PER_LORA_VISION = 0.828e-3  # a LoRA-wrapped linear of the vision tower
EAGER_LLM_TFLOPS = 318.0
EAGER_VISION_TFLOPS = 386.0
RECOMPUTE_FACTOR = 1.48  # an eager step with gradient checkpointing against one without, same micro-batch
# Regional compilation fuses each layer's small kernels and the elementwise work around the GEMMs, so a
# compiled micro-batch has its own model, by part: a fixed cost a decoder layer, one a LoRA-wrapped linear
# (LLM and tower apart: LoRA's dropout, two small matmuls and the add, forward and backward), and the FLOPs of
# the LLM and of the tower at two rates; recompute redoes the compiled forward (COMPILED_RECOMPUTE_FACTOR).
# Fitted 2026-12-07 (eleventh session), least squares on relative error, on the 17 rows of the current core
# (its levers as they are now: tests/unit/src/planning/test_step_time.py lists them): H200, Qwen2-VL 2B r1,
# r2, r3's stages, r4 at 16x1 and 7B r1, r2, r3's stages, r4 at 16x1 and with recompute at 8x2 and 4x4; H100,
# Qwen3-VL-8B r1, r2, r3's stages, r4 at 8x2. Every row within 6.9%; left out one at a time, each within 9.4%.
# (The tenth session's fit mixed in rows of older cores, 2B ones 13-21% slower than the core runs now, and
# predicted the current 2B rows 17-21% slow and 7B r4 8x2 with recompute 17% slow.) Compile time (126 s
# cold) is not in a step: the worker's --compile auto weighs it.
COMPILED_S_PER_LAYER = 2.456e-3  # a decoder layer, forward and backward, one micro-batch
COMPILED_S_PER_LORA_LLM = 0.2645e-3  # a LoRA-wrapped linear of the LLM
COMPILED_S_PER_LORA_VISION = 0.2015e-3  # a LoRA-wrapped linear of the vision tower
COMPILED_LLM_TFLOPS = 662.0
COMPILED_VISION_TFLOPS = 278.0
COMPILED_RECOMPUTE_FACTOR = 1.52  # a compiled step with gradient checkpointing against one without
OPTIMIZER_S = 0.01  # fused AdamW over the adapters, once per optimizer step
# Activation offloading (with recompute): the copies run on a side stream, yet the step slowed by this
# factor, measured once (7B r4, 8x2, compiled, H200, 2026-12-01 eighth session: 1.4174 s against 1.3200).
OFFLOAD_STEP_FACTOR = 1.074
# --compile auto compiles on a GPU only for stages at least this long (optimizer steps). Measured on H200s,
# 16 samples a step (docs/benchmarks.md, 2026-11-30 fourth session): against the bare loop compiling saved
# 0.19-0.32 s a step (2B and 7B, r2 and r4) for 40-110 s on the first step, repaid within 500 steps.
COMPILE_AUTO_MIN_STEPS = 500
COMPILE_S = 110.0  # a stage's first compiled step, cold: the longest measured (7B r4, 108-109 s on H200s)
# A 4-bit stage that dequantizes each weight for every matmul instead of keeping bf16 copies
# (--dequantize-once off, or the copies do not fit): its step against the same stage dequantized once.
# Measured compiled, where its 4-bit decoder layers also stay eager: 2B r1, 16x1, one H200, 0.5356 s
# against 0.3718 s (docs/benchmarks.md, 2026-12-01 fifth session). One measurement; eager steps are assumed
# to slow alike.
PER_USE_DEQUANTIZE_FACTOR = 0.5356 / 0.3718

# --- the Qwen3-VL and Qwen3.5 shapes: by analogy until the GPU measures them --------------------------------
# Every constant above was fitted on Qwen2-VL; the newer shapes reuse them unchanged (the same effective rate,
# the same launch cost a decoder layer or vision block, the same recompute and compile factors), and their
# FLOPs count what differs: heads x head_dim for the attention scores, the DeepStack mergers at the merged
# tokens they run on, and the Gated DeltaNet layers' chunked delta rule. A Gated DeltaNet layer runs
# transformers' reference delta rule: about as many kernels again as a decoder layer before its scan, then
# a Python loop over the micro-batch's chunks, ~12 kernels forward and ~24 backward each (at ~21 us a kernel,
# what the 2026-11-30 launch cost of a LoRA-wrapped 7B layer implied). Its elementwise fp32 traffic is not
# modelled. To be calibrated on the GPU (the 8B Qwen3-VL shape on an H100 first).
DELTA_EXTRA_REGIONS = 1.0  # the delta rule's own kernels before its scan, in decoder layers' worth
DELTA_S_PER_CHUNK = 36 * 21e-6  # forward and backward of one chunk of the scan


def stage_steps(max_steps: int | None, epochs: float, samples: int, samples_per_step: int) -> int:
    """Optimizer steps of one stage: `max_steps` when set, else `epochs` over `samples` (the worker's count
    and the launcher's plan of it)."""
    if max_steps and max_steps > 0:
        return max_steps
    return math.ceil(epochs * samples / samples_per_step)


def compile_chosen(flag: str | bool | None, on_gpu: bool, steps: int) -> bool:
    """Whether a stage of `steps` optimizer steps compiles: "on"/True and "off"/False as asked; "auto"/None
    on a GPU for stages of COMPILE_AUTO_MIN_STEPS or more, never on the CPU. The worker and the
    launcher's plan both decide by this rule."""
    if flag in (True, "on"):
        return True
    if flag in (False, "off"):
        return False
    return on_gpu and steps >= COMPILE_AUTO_MIN_STEPS


def sample_flops(shape: ModelShape, stage: TrainingRecipe, image_patches: int, text_tokens: int) -> float:
    """Model FLOPs of one sample, forward and backward (2 per weight per token; no recomputation)."""
    return sum(flops_by_part(shape, stage, image_patches, text_tokens))


def flops_by_part(
    shape: ModelShape, stage: TrainingRecipe, image_patches: int, text_tokens: int
) -> tuple[float, float]:
    """(LLM and LM head, vision tower and mergers): model FLOPs of one sample, forward and backward.

    The gradient always flows back through the LLM (every recipe trains in or below it), through the
    vision tower only when it or the merger trains. LoRA's own weight gradients are under 1%.
    """
    counts = parameter_counts(shape)
    tokens = image_patches // shape.merge_size**2 + text_tokens
    attention_layers = llm_layer_counts(shape).get(FULL_ATTENTION, 0)
    llm = 2 * counts["llm_linear"] * tokens + 2 * tokens**2 * shape.q_dim * attention_layers
    llm += delta_rule_flops(shape, tokens)
    head = 2 * shape.hidden * shape.vocab * text_tokens
    # The tower's weights once per patch (the merger's too, as the constants were fitted), except what
    # runs elsewhere: the DeepStack mergers on the merged tokens; the position table is a lookup.
    deepstack = deepstack_params(shape)
    per_patch = counts["vision"] - deepstack - shape.vision_positions * shape.vision_embed
    merged = image_patches // shape.merge_size**2
    vision = (
        2 * per_patch * image_patches
        + 2 * deepstack * merged
        + 4 * image_patches**2 * shape.vision_embed * shape.vision_depth
    )
    return float(2 * (llm + head)), float(vision * (2 if vision_trains(stage) else 1))


def delta_rule_flops(shape: ModelShape, tokens: int) -> int:
    """Forward FLOPs of the Gated DeltaNet layers' chunked delta rule for one sample (linear in its tokens):
    per token and value head, the chunk's two key products and its triangular solves, then the scan's
    reads and write of the recurrent state (key x value head widths) and its intra-chunk product."""
    delta = shape.linear_attention
    if delta is None:
        return 0
    dk, dv, chunk = delta.key_head_dim, delta.value_head_dim, DELTA_CHUNK
    macs = 2 * chunk * dk + chunk * (dk + dv) // 2 + chunk * dv + 3 * dk * dv
    return 2 * macs * delta.value_heads * tokens * delta.layers


def predict_step_seconds(
    shape: ModelShape,
    recipe: TrainingRecipe,
    micro_batch: int,
    grad_accum: int,
    image_patches: int,
    text_tokens: int,
    checkpointing: bool,
    compiled: bool = False,
    offloaded: bool = False,
    dequantized: bool = True,
) -> float:
    """Predicted seconds of one optimizer step on the card the constants were fitted on (see above).

    A chain's stages run one after the other: its step is the mean of its stages' steps. `offloaded`
    counts only with recompute, as the worker offloads only then. `dequantized=False`: a 4-bit stage
    dequantizes its weights on every use (PER_USE_DEQUANTIZE_FACTOR); the fits above are of stages
    dequantized once.
    """
    stages = recipe.stages or (recipe,)
    total = 0.0
    for stage in stages:
        if compiled:
            micro = compiled_micro_seconds(shape, stage, micro_batch, image_patches, text_tokens)
        else:
            micro = eager_micro_seconds(shape, stage, micro_batch, image_patches, text_tokens)
        if stage.quantized and not dequantized:
            micro *= PER_USE_DEQUANTIZE_FACTOR
        recompute = COMPILED_RECOMPUTE_FACTOR if compiled else RECOMPUTE_FACTOR
        total += grad_accum * micro * (recompute if checkpointing else 1.0) + OPTIMIZER_S
    return total / len(stages) * (OFFLOAD_STEP_FACTOR if offloaded and checkpointing else 1.0)


def compiled_micro_seconds(
    shape: ModelShape, stage: TrainingRecipe, micro_batch: int, image_patches: int, text_tokens: int
) -> float:
    """One compiled micro-batch of a stage, forward and backward, without recompute (the COMPILED_* fit)."""
    wrapped = lora_targets(shape, stage)
    fixed = (
        shape.layers * COMPILED_S_PER_LAYER
        + len(wrapped.get("llm", {})) * shape.layers * COMPILED_S_PER_LORA_LLM
        + len(wrapped.get("vision", {})) * shape.vision_depth * COMPILED_S_PER_LORA_VISION
        + delta_seconds(shape, image_patches, text_tokens, COMPILED_S_PER_LAYER)
    )
    llm, vision = flops_by_part(shape, stage, image_patches, text_tokens)
    compute = llm / (COMPILED_LLM_TFLOPS * 1e12) + vision / (COMPILED_VISION_TFLOPS * 1e12)
    return fixed + micro_batch * compute


def eager_micro_seconds(
    shape: ModelShape, stage: TrainingRecipe, micro_batch: int, image_patches: int, text_tokens: int
) -> float:
    """One eager micro-batch of a stage, forward and backward, without recompute (the EAGER_* fit)."""
    wrapped = lora_targets(shape, stage)
    llm, vision = flops_by_part(shape, stage, image_patches, text_tokens)
    compute = llm / (EAGER_LLM_TFLOPS * 1e12) + vision / (EAGER_VISION_TFLOPS * 1e12)
    return (
        launch_seconds(shape, image_patches, text_tokens)
        + len(wrapped.get("llm", {})) * shape.layers * EAGER_S_PER_LORA_LLM
        + len(wrapped.get("vision", {})) * shape.vision_depth * EAGER_S_PER_LORA_VISION
        + micro_batch * compute
    )


def launch_seconds(shape: ModelShape, image_patches: int, text_tokens: int) -> float:
    """The fixed eager cost of one micro-batch's regions: its decoder layers and vision blocks, and the Gated
    DeltaNet layers' own kernels, whose scan is a Python loop over the chunks of the (padded) sequence."""
    regions = shape.layers + shape.vision_depth
    return regions * EAGER_S_PER_REGION + delta_seconds(shape, image_patches, text_tokens, EAGER_S_PER_REGION)


def delta_seconds(shape: ModelShape, image_patches: int, text_tokens: int, per_layer: float) -> float:
    """The Gated DeltaNet layers' own fixed cost (0 without them): their kernels before the scan, in decoder
    layers of `per_layer` seconds, and the scan, a Python loop over the chunks of the (padded) sequence."""
    delta_layers = llm_layer_counts(shape).get(LINEAR_ATTENTION, 0)
    if not delta_layers:
        return 0.0
    seq = image_patches // shape.merge_size**2 + text_tokens
    chunks = -(-seq // DELTA_CHUNK)
    return delta_layers * (DELTA_EXTRA_REGIONS * per_layer + chunks * DELTA_S_PER_CHUNK)


@dataclass(frozen=True)
class Candidate:
    """One way to run `samples_per_step` samples an optimizer step, with its predicted cost."""

    micro_batch: int
    grad_accum: int
    checkpointing: bool
    compile: bool
    predicted_gib: float
    predicted_step_s: float
    fits: bool
    dequantized: bool = False  # a 4-bit stage keeps bf16 copies of its weights (counted in predicted_gib)

    def describe(self) -> str:
        return (
            f"micro-batch {self.micro_batch} x accumulation {self.grad_accum}, recompute "
            f"{'on' if self.checkpointing else 'off'}{', compiled' if self.compile else ''}"
            f"{', dequantized once' if self.dequantized else ''}: "
            f"{self.predicted_step_s:.2f} s a step, {self.predicted_gib:.1f} GiB"
            f"{'' if self.fits else ' (does not fit)'}"
        )


def rank_settings(
    shape: ModelShape,
    recipe: TrainingRecipe,
    samples_per_step: int,
    capacity_bytes: int,
    image_patches: int,
    text_tokens: int,
    *,
    headroom: float = HEADROOM,
    checkpointing_choices: tuple[bool, ...] = (False, True),
    compile_choices: tuple[bool, ...] = (False,),
    offloaded: bool = False,
    dequantize_choices: tuple[bool, ...] = (False,),
) -> list[Candidate]:
    """Every micro-batch x accumulation x recompute x compile (x dequantized once, for a 4-bit stage)
    setting of `samples_per_step`, fitting ones first and each group fastest first: the head of the list is
    the setting to run. `offloaded`: the settings with recompute offload its blocks' inputs.
    `dequantize_choices` (True, False) also weighs a 4-bit recipe's bf16 copies: faster, and larger."""
    budget = headroom * capacity_bytes
    found = []
    for micro in (d for d in range(1, samples_per_step + 1) if samples_per_step % d == 0):
        for ckpt, compiled, dequantized in itertools.product(
            checkpointing_choices, compile_choices, dequantize_choices if recipe.quantized else (False,)
        ):
            how = {"compiled": compiled, "offloaded": offloaded, "dequantized": dequantized}
            accum = samples_per_step // micro
            work = (image_patches, text_tokens, ckpt)
            peak = estimate_recipe_memory(shape, recipe, micro, *work, **how).total
            seconds = predict_step_seconds(shape, recipe, micro, accum, *work, **how)
            found.append(
                Candidate(
                    micro,
                    accum,
                    ckpt,
                    compiled,
                    round(peak / GIB, 2),
                    round(seconds, 4),
                    peak <= budget,
                    dequantized,
                )
            )
    return sorted(found, key=lambda c: (not c.fits, c.predicted_step_s))
