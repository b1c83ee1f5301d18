"""GPU memory planner: the peak CUDA memory of one training stage, predicted without torch.

What it predicts: `torch.cuda.max_memory_allocated` of one stage of a recipe (the worker's TRL path:
bf16 weights or a 4-bit nf4 LLM, LoRA adapters, bf16 autocast, SDPA, TRL's fused LM head, AdamW), for a
model's config.json, a micro-batch size, an image size and gradient checkpointing on or off. Stdlib only, so
the launcher (which never imports torch) and the worker can both call it.

    from src.planning.memory import estimate_recipe_memory
    from src.planning.parameters import ModelShape
    from src.planning.pixels import image_grid, limits_from_config
    shape = ModelShape.from_model_dir(model_dir)
    patches, _ = image_grid(644, 476, *limits_from_config(model_dir))
    estimate_recipe_memory(shape, recipe, 4, patches, text_tokens=100, checkpointing=True).gib

    python -m src.planning.memory --shape 7b --batch-size 4       # every recipe, checkpointing on and off
    python -m src.planning.memory --shape qwen3-vl-8b             # Qwen3-VL-8B-Instruct (planning/shapes.py)

The peak is weights + trainable state + activations + workspace + overhead:
  * weights: every parameter in bf16 (2 B); a quantized stage keeps the LLM's decoder linears in nf4 with
    double quantization (0.5 B + 1/64 B of 8-bit absmax + fp32 second-level absmax per 256 blocks); one
    dequantized once (src/models/dequantize.py) keeps bf16 copies of them beside (2 B), and its layers then
    compile as bf16 ones do. Measured, r1 compiled at 8x2 dequantized once (one H100, 2026-12-07): Qwen3-VL-8B
    45.45 GiB, Qwen2-VL-7B 43.7 GiB (2026-12-01), where the plan without the copies said 37.07 and 36.5.
  * trainable state: LoRA parameters fp32 (PEFT upcasts adapters of a bf16 model), their fp32 gradients and
    AdamW's two fp32 moments: 16 B per parameter. On a 4-bit model TRL casts the adapters to bf16, and the
    grads and moments follow: 8 B per parameter. A part trained "full" (PEFT modules_to_save) adds a bf16
    trainable copy of its weights, a bf16 gradient and two bf16 moments: 8 B per parameter (the frozen
    original it keeps is already in the weights).
  * activations: what autograd keeps for backward, summed per part at the end of the forward pass. Per token
    of a Qwen2 decoder layer (h hidden, I intermediate, bf16 = 2 B, fp32 = 4 B):
      two RMSNorms (python, fp32 upcast): fp32 copy of the input + rsqrt     2 * (4h + 4)
      SDPA: q, k, v (k/v repeated to all heads under a padding mask), out     2 * 4h, + 4 B lse per head
      SwiGLU: gate output (silu input), silu output, up output                3 * 2I
      each LoRA-wrapped linear of input width d: dropout mask (bool) + the
      bf16 input of lora_A (autocast's copy) + the rank-r input of lora_B     1d + 2d + 2r
    plus, per layer, the bf16 additive mask SDPA keeps (batch * seq * seq) and autocast's bf16 copies of fp32
    adapter weights. A vision block (embed e, MLP m) keeps per patch: two LayerNorms run in fp32 by autocast
    (fp32 input copy + mean/rstd; RMSNorm on Qwen2.5-VL), q and k after RoPE, the whole fused qkv output (v
    is a view of it), the attention output and lse (12e + 4 B per head), QuickGELU's input and sigmoid
    (2 * 2m; SwiGLU on Qwen2.5-VL: 3 * 2m), and the same LoRA terms. With gradient checkpointing every
    decoder layer and vision block keeps only its bf16 input (2h per token, 2e per patch) and one layer is
    recomputed at a time in backward. Vision and merger activations exist only when the stage trains one of
    them (a frozen tower runs under no_grad); the LLM's always do, since every recipe back-propagates through
    it.
  * workspace: transient buffers at the peak: the gradients flowing through one layer's MLP in backward
    (with a LoRA-wrapped down projection, a bf16 grad and the fp32 chain through PEFT's dropout), the
    dequantized bf16 weight of a 4-bit linear, and TRL's fused LM head tile.
  * overhead: the batch's pixel values (fp32) and token tensors, and the cuBLAS workspaces.
The peak is the largest of three moments: backward through the last decoder layer (all kept activations + one
recomputed layer + its gradients), backward through the vision tower (the LLM's activations are freed by then)
and the LM head's backward. Constants are named below with where they come from; calibrate them against
GPU measurements (docs/benchmarks.md). tests/unit/src/planning/test_memory.py checks the activation terms
against the bytes autograd saves on CPU.

Qwen3-VL and Qwen3.5 (src/planning/parameters.py says what differs). What their layers keep was counted from
the bytes autograd saves on the CPU, like Qwen2-VL's, and is checked the same way: an attention layer's q and
k are heads x head_dim wide and each keeps its q_norm/k_norm (fp32 copy + rsqrt per head), Qwen3.5's output
gate keeps its sigmoid and the output it scales; a Gated DeltaNet layer keeps its conv, gated norm and the
chunked delta rule's fp32 tensors (delta_layer_bytes); the towers' tanh GELU keeps only its input; each
DeepStack merger keeps what the merger does per merged token, its norm over the merged width, and adding
its output to the first LLM layers keeps nothing more. What no GPU has measured yet (the 8B shape is to be
measured on an H100): the CUDA dtypes of those terms (taken as the Qwen2-VL ones), the Gated DeltaNet
backward workspace (DELTA_BWD_WORKSPACE), DeepStack's gradients held in the tower during the LLM's backward,
and every fitted constant above (compiled activations, offloading), which these shapes reuse by analogy.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from src.contract.families import vision_trains
from src.planning.parameters import (
    FULL_ATTENTION,
    LINEAR_ATTENTION,
    QWEN3_FAMILIES,
    ModelShape,
    all_llm_linears,
    llm_layer_counts,
    llm_linears,
    lora_parameters,
    lora_targets,
    merger_linears,
    merger_params,
    parameter_counts,
    vision_block_params,
    vision_linears,
)
from src.planning.pixels import (
    image_grid,
    limits_from_config,
)
from src.planning.shapes import PUBLISHED_NAMES, published_shape
from src.recipes import RECIPES, TrainingRecipe

GIB = 2**30
BF16, FP32 = 2, 4

# --- weights -------------------------------------------------------------------------------------------
# bitsandbytes nf4 with double quantization (src/models/loader.py): 4 bits per weight, one 8-bit absmax per
# block of 64, one fp32 absmax per 256 of those blocks.
NF4_BLOCK, NF4_BLOCKS_PER_ABSMAX2 = 64, 256
NF4_BYTES_PER_PARAM = 0.5 + 1 / NF4_BLOCK + FP32 / (NF4_BLOCK * NF4_BLOCKS_PER_ABSMAX2)

# --- trainable state -----------------------------------------------------------------------------------
# PEFT keeps adapters of a bf16 model in fp32 (autocast_adapter_dtype); grads match the parameter dtype and
# torch AdamW keeps exp_avg and exp_avg_sq in it too. TRL 1.16 casts the adapters of a 4-bit model to bf16
# (sft_trainer.py, "When using QLoRA, the PEFT adapter weights are converted to bf16").
ADAM_MOMENTS = 2
# PEFT 0.21's modules_to_save deep-copies the module in the model's dtype (its fp32 upcast covers adapters
# only): on the tiny model loaded in bf16 the copy, its gradient and AdamW's exp_avg/exp_avg_sq were all bf16.
FULL_COPY_BYTES = BF16

# --- activations ---------------------------------------------------------------------------------------
NORM_FP32_STATS = FP32  # RMSNorm keeps rsqrt(variance) per row in fp32
ROPE_TABLES = 2  # cos and sin, shared by every layer
# transformers' reference Gated DeltaNet (torch_chunk_gated_delta_rule; no flash-linear-attention in this
# stack) scans the sequence in chunks of this many tokens, the sequence padded up to a whole chunk.
DELTA_CHUNK = 64


@dataclass(frozen=True)
class KernelBytes:
    """Bytes per element of the saved tensors whose dtype depends on the device's kernels.

    The defaults are CUDA's; the CPU test passes its own (non-fused dropout keeps a mask in the input's dtype,
    CPU autocast leaves layer_norm in bf16, CPU SDPA does not pad the mask).
    """

    dropout_mask: float = 1  # native_dropout keeps a bool mask
    layer_norm_input: float = FP32  # autocast runs layer_norm in fp32: it saves an fp32 copy of its input
    layer_norm_stats: float = 2 * FP32  # mean and rstd per row
    attn_bias_align: int = 16  # memory-efficient SDPA pads the last dim of the bf16 mask it keeps


CUDA_KERNELS = KernelBytes()
# Measured on CPU (tests/unit/src/planning/test_memory.py): dropout multiplies by a mask in the dtype of
# PEFT's fp32 cast of the input, layer_norm stays bf16 under CPU autocast (its mean/rstd too), and SDPA's kept
# mask is not padded.
CPU_KERNELS = KernelBytes(
    dropout_mask=FP32, layer_norm_input=BF16, layer_norm_stats=2 * BF16, attn_bias_align=1
)

# --- workspace (transient at the peak) -----------------------------------------------------------------
# Backward through an MLP: with a LoRA-wrapped down projection, the bf16 grad of its input plus the fp32 grad
# through PEFT's fp32 cast and dropout (two fp32 tensors) = 5 bf16-sized buffers per intermediate element;
# frozen, the three bf16 grads of the gate/up product. Plus the bf16 grad of the layer output and residual.
BWD_INTER_BUFFERS_LORA = 5
BWD_INTER_BUFFERS_FROZEN = 3
BWD_HIDDEN_BUFFERS = 2
# The final RMSNorm's backward runs in fp32 (grad, normalised input and product) before the first layer.
FINAL_NORM_BWD_FP32_BUFFERS = 3
# By analogy, not yet measured on a GPU (Qwen3.5): the backward of a Gated DeltaNet layer's chunked delta rule
# holds about as many bytes of fp32 and bf16 gradients as the rule kept for it.
DELTA_BWD_WORKSPACE = 1.0
# By analogy, not yet measured on a GPU (Qwen3-VL): each DeepStack merger's gradient reaches the vision block
# it taps while the LLM's backward runs, and waits there for the main path: bf16 grads of the tower's width
# per patch, this many a DeepStack merger, held through the tower's backward.
DEEPSTACK_HELD_GRADS = 1
# TRL 1.16 fused LM head (trl/kernels/chunked_logprob.py): tiles of TOKEN_CHUNK_SIZE label positions x
# chunk_size vocabulary entries in the compute dtype, and an fp32 grad of the label positions' hidden states.
# (With Triton, i.e. on CUDA, only label positions are scored; without it every position is.)
LM_HEAD_TILE_TOKENS, LM_HEAD_TILE_VOCAB = 4096, 32768
# The per-label tensors the fused head keeps: int64 target, fp32 log-normaliser and entropy.
LM_HEAD_BYTES_PER_LABEL = 8 + FP32 + FP32

# --- compiled regions (src/training/compile.py) --------------------------------------------------------
# Inductor fuses the norms, activations, rotary and LoRA's elementwise work inside each compiled layer, so
# fewer intermediates are saved for backward: the decoder layers (and the LLM's other parts) keep this share
# of what this planner counts uncompiled, the vision blocks this one. Fitted 2026-12-07 (eleventh session),
# minimax relative error of the peak, on the 13 compiled rows of the current core without recompute (H200:
# Qwen2-VL 2B and 7B r1, r2, r3's stages, r4 at 16x1; H100: Qwen3-VL-8B r1, r2, r4 at 8x2;
# docs/measured_rows.json): every row within 3.7% (one factor for both, 0.82, left r2 and r3's first stage
# 6.4-7.2% high, and Qwen3-VL-8B r4 3.9% low). With recompute nothing changes (7B r4 4x4: 18.1 GiB measured,
# 18.2 planned); 4-bit stages keep their LLM layers eager unless dequantized, and are not counted as compiled.
COMPILED_LLM_ACTIVATIONS = 0.865
COMPILED_VISION_ACTIVATIONS = 0.735

# --- activation offloading (src/training/offload.py) -----------------------------------------------------
# With recompute, offloading moves the checkpointed blocks' inputs to pinned host memory; backward holds
# the block input in use and the one prefetched behind it. Measured on an H200 (2026-12-01, eighth session),
# 7B r4 at 8x2, recompute on, compiled: 17.93 GiB offloaded, 19.70 GiB not (planned 20.05 for both before).
# The other saved tensors of 1 MiB or more outside the blocks move too; the plan keeps them on the GPU.
OFFLOAD_RESIDENT_BLOCKS = 2

# --- overhead ------------------------------------------------------------------------------------------
# cuBLAS workspaces come from the caching allocator: 32 MiB per handle on Hopper (CUBLAS_WORKSPACE_CONFIG
# :4096:8), one handle for the forward thread and one for autograd's device thread.
CUBLAS_WORKSPACE_BYTES = 2 * 32 * 2**20
TOKEN_TENSORS = 4  # input_ids, labels, attention_mask, mm_token_type_ids (int64 per token)
ALLOCATOR_ROUNDING = 0.005  # the caching allocator rounds blocks up to 512 B; a small share of the total
# A setting "fits" when its estimate is within this share of the GPU: the margin every choice keeps
# (recompute off, 4-bit weights dequantized once, --batch-size auto's fastest setting).
HEADROOM = 0.85


def weight_bytes(shape: ModelShape, quantized: bool) -> int:
    counts = parameter_counts(shape)
    llm_linear = counts["llm_linear"] * (NF4_BYTES_PER_PARAM if quantized else BF16)
    return int(llm_linear + BF16 * (counts["llm_other"] + counts["vision"]))


def adapter_bytes(stage: TrainingRecipe) -> int:
    """Bytes per adapter element: fp32 on a bf16 model, bf16 on a 4-bit one (TRL's cast)."""
    return BF16 if stage.quantized else FP32


def full_parameters(shape: ModelShape, stage: TrainingRecipe) -> int:
    """Parameters of the parts trained "full": each has a trainable copy (PEFT modules_to_save)."""
    per_part = {
        "vision": lambda: shape.vision_depth * vision_block_params(shape),
        "merger": lambda: merger_params(shape),
        "lm_head": lambda: shape.vocab * shape.hidden,
    }
    return sum(per_part[part]() for part, mode in stage.modes().items() if mode == "full")


def trainable_state_bytes(shape: ModelShape, stage: TrainingRecipe) -> int:
    """Adapters + their grads + AdamW moments in the adapter dtype; full parts' copies likewise in bf16."""
    lora = lora_parameters(shape, stage) * adapter_bytes(stage)
    return (lora + full_parameters(shape, stage) * FULL_COPY_BYTES) * (2 + ADAM_MOMENTS)


# --- activations ---------------------------------------------------------------------------------------


def _lora_saved_per_row(d_in: int, rank: int, dropout: float, kernels: KernelBytes) -> float:
    """Per token: the dropout mask, lora_A's bf16 input and lora_B's rank-wide bf16 input."""
    mask = kernels.dropout_mask * d_in if dropout > 0 else 0
    return mask + BF16 * d_in + BF16 * rank


def _lora_saved(linears, rank, dropout, kernels) -> float:
    return sum(_lora_saved_per_row(d_in, rank, dropout, kernels) for d_in, _ in linears.values())


def _lora_weight_casts(linears, rank: int, adapter: int) -> int:
    """Autocast's bf16 copies of fp32 adapter weights, kept for backward (none when adapters are bf16)."""
    return BF16 * rank * sum(d_in + d_out for d_in, d_out in linears.values()) if adapter == FP32 else 0


def _norm_saved(width: int, rms: bool, kernels: KernelBytes) -> float:
    if rms:  # python RMSNorm: fp32 copy of the input and rsqrt per row, on every device
        return FP32 * width + NORM_FP32_STATS
    return kernels.layer_norm_input * width + kernels.layer_norm_stats


@dataclass(frozen=True)
class Batch:
    """One micro-batch as the planner sees it: every sample padded to the same length."""

    size: int
    image_patches: int  # per sample (one image each)
    text_tokens: int  # per sample, besides the image tokens
    label_tokens: float  # per sample, positions the loss is computed on
    padded: bool = True  # a padding mask goes into SDPA (texts differ in length)

    def seq(self, shape: ModelShape) -> int:
        return self.image_patches // shape.merge_size**2 + self.text_tokens

    def tokens(self, shape: ModelShape) -> int:
        return self.size * self.seq(shape)

    @property
    def patches(self) -> int:
        return self.size * self.image_patches


def llm_layer_bytes(shape, linears, batch: Batch, rank, dropout, adapter, kernels=CUDA_KERNELS) -> float:
    """What one attention decoder layer keeps for backward (the gradient flows through it)."""
    h, q, seq = shape.hidden, shape.q_dim, batch.seq(shape)
    # transformers repeats k/v to every head when it passes a mask (a view when there is one kv head)
    kv_saved = q if batch.padded and shape.kv_heads > 1 else shape.kv_dim
    per_token = 2 * _norm_saved(h, True, kernels)
    per_token += BF16 * (2 * q + 2 * kv_saved) + FP32 * shape.heads  # q, k, v, out, logsumexp
    per_token += _head_norms_saved(shape) + _attention_gate_saved(shape)
    per_token += 3 * BF16 * shape.intermediate  # gate output, silu output, up output
    per_token += _lora_saved(linears, rank, dropout, kernels)
    mask = batch.size * seq * _round_up(seq, kernels.attn_bias_align) * BF16 if batch.padded else 0
    weights = _norm_weight_copies(shape, 2 * h + (2 * shape.head_dim if shape.qk_norm else 0))
    return per_token * batch.tokens(shape) + mask + _lora_weight_casts(linears, rank, adapter) + weights


def _norm_weight_copies(shape: ModelShape, widths: int) -> int:
    """Qwen3.5's RMSNorms store weight - 1 and keep the fp32 (1 + weight) they scale by: once a norm."""
    return FP32 * widths if shape.family == "qwen3_5" else 0


def _head_norms_saved(shape: ModelShape) -> int:
    """Qwen3's q_norm and k_norm, python RMSNorms over each head: an fp32 copy of q and k, an rsqrt a head."""
    if not shape.qk_norm:
        return 0
    return FP32 * (shape.q_dim + shape.kv_dim) + NORM_FP32_STATS * (shape.heads + shape.kv_heads)


def _attention_gate_saved(shape: ModelShape) -> int:
    """Qwen3.5's output gate, out * sigmoid(gate): the sigmoid's output and the attention output it scales."""
    return 2 * BF16 * shape.q_dim if shape.attention_gate else 0


def delta_layer_bytes(shape, linears, batch: Batch, rank, dropout, adapter, kernels=CUDA_KERNELS) -> float:
    """What one Gated DeltaNet layer (Qwen3.5's "linear_attention") keeps for backward.

    Counted from what autograd saves on the CPU (tests/unit/src/planning/test_memory.py); these are plain
    torch ops, the same on CUDA, but no GPU has measured them yet: calibrate on the GPU.
    """
    delta = shape.linear_attention
    assert delta is not None, "only Qwen3.5 has Gated DeltaNet layers"
    heads, value_dim = delta.value_heads, delta.value_dim
    # (its input times the padding mask keeps the mask: the batch's attention_mask, counted as overhead)
    per_token = 2 * _norm_saved(shape.hidden, True, kernels)
    per_token += 2 * BF16 * delta.conv_dim  # the causal conv1d's input and its silu's input
    per_token += (BF16 + FP32) * heads  # beta (a sigmoid's output), the decay's softplus input (fp32)
    # the gated RMSNorm over each value head: an fp32 copy of its input, an rsqrt a head, the fp32 gate
    # (silu's input) and silu's output, and the bf16 normalised output the gate multiplies
    per_token += FP32 * 3 * value_dim + FP32 * heads + BF16 * value_dim
    per_token += 3 * BF16 * shape.intermediate  # the MLP, as in an attention layer
    per_token += _lora_saved(linears, rank, dropout, kernels)
    delta_rule = _delta_rule_saved(shape, batch)
    weights = _norm_weight_copies(shape, 2 * shape.hidden)
    return per_token * batch.tokens(shape) + delta_rule + _lora_weight_casts(linears, rank, adapter) + weights


def _delta_rule_saved(shape: ModelShape, batch: Batch) -> float:
    """What the chunked gated delta rule keeps (transformers' torch_chunk_gated_delta_rule), per value head
    (the key heads are repeated to them) of every padded token, and per chunk its recurrent state."""
    delta = shape.linear_attention
    if delta is None:
        return 0.0
    dk, dv, chunk = delta.key_head_dim, delta.value_head_dim, DELTA_CHUNK
    padded = batch.size * _round_up(batch.seq(shape), chunk)
    l2_norms = FP32 * (2 * dk + 2) * batch.tokens(shape)  # q and k before padding, their inverse norms
    # fp32, padded: value, beta, key, k*beta, the pairwise decays, the triangular system, its two
    # solutions, the decayed query, three decay exps
    fp32 = 4 * dk + 2 * dv + 2 * chunk + 4
    # bf16 copies autocast makes for the matmuls: the two chunk products' operands and results, and the
    # scan's slices (k_cumdecay, query, key, the intra-chunk attention, the new values twice)
    bf16 = 7 * dk + 2 * dv + 3 * chunk
    # each chunk's recurrent state: two bf16 matmul copies and the fp32 decay product
    state = (2 * BF16 + FP32) * dk * dv
    # the first chunk reads a zero state (its k_cumdecay and query slices are not kept); the last chunk's
    # state update feeds no output, so what it kept is freed with it
    ends = BF16 * 2 * chunk * dk + FP32 * dk * dv + BF16 * chunk * (dk + dv)
    per_head = l2_norms + (FP32 * fp32 + BF16 * bf16) * padded + state * padded // chunk - batch.size * ends
    return delta.value_heads * per_head + chunk * chunk  # and the causal mask of a chunk (bool)


LAYER_BYTES = {FULL_ATTENTION: llm_layer_bytes, LINEAR_ATTENTION: delta_layer_bytes}


def llm_layers_of_each_kind(shape, wrapped_llm, batch: Batch, *args) -> dict[str, float]:
    """What one decoder layer of each kind keeps, its own wrapped linears' LoRA terms included."""
    return {
        kind: LAYER_BYTES[kind](shape, _kind_linears(shape, wrapped_llm, kind), batch, *args)
        for kind in llm_layer_counts(shape)
    }


def _kind_linears(shape: ModelShape, wrapped_llm, kind: str) -> dict[str, tuple[int, int]]:
    own = llm_linears(shape, kind)
    return {name: dims for name, dims in wrapped_llm.items() if name in own}


def vision_block_bytes(shape, linears, batch: Batch, rank, dropout, adapter, kernels=CUDA_KERNELS) -> float:
    """What one vision block keeps for backward."""
    e, m = shape.vision_embed, shape.vision_intermediate
    per_patch = 2 * _norm_saved(e, shape.vision_gated, kernels)
    # q and k after RoPE, the fused qkv output (v is a view of it), the output; lse per head.
    per_patch += BF16 * (e + e + 3 * e + e) + FP32 * shape.vision_heads
    per_patch += BF16 * m * _vision_mlp_saved(shape)
    per_patch += _lora_saved(linears, rank, dropout, kernels)
    return per_patch * batch.patches + _lora_weight_casts(linears, rank, adapter)


def _vision_mlp_saved(shape: ModelShape) -> int:
    """bf16 tensors of the MLP's width a vision block keeps: SwiGLU's gate output, silu output and up output
    (Qwen2.5-VL), QuickGELU's input and sigmoid (Qwen2-VL), the tanh GELU's input (Qwen3 towers)."""
    if shape.vision_gated:
        return 3
    return 1 if shape.family in QWEN3_FAMILIES else 2


def merger_bytes(shape, linears, batch: Batch, rank, dropout, adapter, kernels=CUDA_KERNELS) -> float:
    """The patch merger: its norm per patch, then GELU's input and LoRA terms per merged token. Qwen3-VL's
    DeepStack mergers keep the same per merged token, their norm over the merged width."""
    tokens = batch.patches // shape.merge_size**2
    norm = _norm_saved(shape.vision_embed, shape.vision_gated, kernels) * batch.patches
    per_token = BF16 * shape.merger_hidden + _lora_saved(linears, rank, dropout, kernels)
    one = per_token * tokens + _lora_weight_casts(linears, rank, adapter)
    deepstack_norm = _norm_saved(shape.merger_hidden, False, kernels) * tokens
    return norm + one + shape.deepstack_mergers * (deepstack_norm + one)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def vision_has_grad(stage: TrainingRecipe, checkpointing: bool, frozen_vision_no_grad: bool) -> bool:
    """Whether the vision blocks record activations.

    They do when they train. Frozen, they record only when their input requires grad: under checkpointing
    enable_input_require_grads (TRL) makes the patch embedding's output require grad, unless the tower
    runs under no_grad (the worker does that when nothing in it, merger included, trains).
    """
    if stage.train_vision != "frozen":
        return True
    return checkpointing and (vision_trains(stage) or not frozen_vision_no_grad)


def _full_saved_per_row(linears: dict[str, tuple[int, int]]) -> int:
    """A trained linear keeps its bf16 input for its weight's gradient (a frozen one keeps nothing)."""
    return BF16 * sum(d_in for d_in, _ in linears.values())


def full_block_bytes(shape: ModelShape, stage: TrainingRecipe, batch: Batch) -> int:
    """What one vision block trained "full" keeps besides vision_block_bytes: its linears' inputs."""
    return batch.patches * _full_saved_per_row(vision_linears(shape)) if stage.train_vision == "full" else 0


def activation_parts(
    shape: ModelShape,
    stage: TrainingRecipe,
    batch: Batch,
    checkpointing: bool,
    frozen_vision_no_grad: bool = True,
    kernels: KernelBytes = CUDA_KERNELS,
) -> dict[str, float]:
    """Bytes autograd keeps at the end of the forward pass, per part (the test measures the same parts)."""
    wrapped = lora_targets(shape, stage)
    args = (stage.lora_rank, stage.lora_dropout, adapter_bytes(stage), kernels)
    tokens, h = batch.tokens(shape), shape.hidden
    seq = batch.seq(shape)
    layers = llm_layers_of_each_kind(shape, wrapped.get("llm", {}), batch, *args)
    counts = llm_layer_counts(shape)
    parts = {
        "llm_layers": sum(n * (BF16 * h * tokens if checkpointing else layers[k]) for k, n in counts.items()),
        # final RMSNorm, RoPE tables, the image-scatter and causal masks (bool). Qwen3-VL's DeepStack
        # additions to the first layers' image positions keep nothing more (measured on the CPU).
        "llm_other": tokens * (_norm_saved(h, True, kernels) + ROPE_TABLES * BF16 * shape.rotary_dim + 1)
        + batch.size * seq * seq,
        "lm_head": batch.size * batch.label_tokens * (BF16 * h + LM_HEAD_BYTES_PER_LABEL) + 2 * tokens,
        "vision_blocks": 0.0,
        "vision_other": 0.0,
        "merger": 0.0,
    }
    blocks_grad = vision_has_grad(stage, checkpointing, frozen_vision_no_grad)
    if blocks_grad:
        block = vision_block_bytes(shape, wrapped.get("vision", {}), batch, *args)
        block += full_block_bytes(shape, stage, batch)
        e = shape.vision_embed
        parts["vision_blocks"] = shape.vision_depth * (BF16 * e * batch.patches if checkpointing else block)
        parts["vision_other"] = ROPE_TABLES * FP32 * (e // shape.vision_heads) * batch.patches
    if blocks_grad or stage.train_merger != "frozen":
        parts["merger"] = merger_bytes(shape, wrapped.get("merger", {}), batch, *args)
        if stage.train_merger == "full":
            merged_tokens = batch.patches // shape.merge_size**2
            parts["merger"] += shape.mergers * merged_tokens * _full_saved_per_row(merger_linears(shape))
    return parts


# --- the estimate --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes of one stage, by kind."""

    weights: int
    trainable_state: int
    activations: int
    workspace: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable_state + self.activations + self.workspace + self.overhead

    @property
    def gib(self) -> float:
        return self.total / GIB

    def as_dict(self) -> dict:
        fields = {name: round(value / GIB, 2) for name, value in asdict(self).items()}
        return {**fields, "total": round(self.gib, 2)}


def _backward_buffers(linears, down: str) -> int:
    return BWD_INTER_BUFFERS_LORA if down in linears else BWD_INTER_BUFFERS_FROZEN


def _offloaded(parts: dict[str, float], shape: ModelShape) -> dict[str, float]:
    """The parts with the checkpointed blocks' inputs on the host, but those backward holds on the GPU."""
    held = dict(parts)
    held["llm_layers"] = parts["llm_layers"] * OFFLOAD_RESIDENT_BLOCKS / shape.layers
    held["vision_blocks"] = parts["vision_blocks"] * OFFLOAD_RESIDENT_BLOCKS / shape.vision_depth
    return held


def _peak_phases(
    shape,
    stage,
    batch,
    checkpointing,
    frozen_vision_no_grad,
    kernels,
    offloaded,
    dequantized=False,
    compiled=False,
) -> list[tuple]:
    """(activations, workspace) at each moment the peak can happen. `compiled`: the parts are what compiled
    layers keep (COMPILED_LLM_ACTIVATIONS, COMPILED_VISION_ACTIVATIONS)."""
    parts = activation_parts(shape, stage, batch, checkpointing, frozen_vision_no_grad, kernels)
    if compiled:
        parts = {
            name: size
            * (COMPILED_VISION_ACTIVATIONS if name.startswith("vision") else COMPILED_LLM_ACTIVATIONS)
            for name, size in parts.items()
        }
    if offloaded and checkpointing:  # without recompute the worker does not offload (run.resolve_...)
        parts = _offloaded(parts, shape)
    wrapped = lora_targets(shape, stage)
    args = (stage.lora_rank, stage.lora_dropout, adapter_bytes(stage), kernels)
    tokens, h = batch.tokens(shape), shape.hidden
    kept = sum(parts.values())

    llm = wrapped.get("llm", {})
    layers = llm_layers_of_each_kind(shape, llm, batch, *args)
    recompute = max(layers.values()) if checkpointing else 0
    mlp_grads = (
        tokens * BF16 * (_backward_buffers(llm, "down_proj") * shape.intermediate + BWD_HIDDEN_BUFFERS * h)
    )
    # a Gated DeltaNet layer's mixer runs its backward apart from its MLP's: the larger of the two
    grads = max(mlp_grads, DELTA_BWD_WORKSPACE * _delta_rule_saved(shape, batch))
    if stage.quantized and not dequantized:  # bitsandbytes dequantizes a whole 4-bit weight for each matmul
        grads += BF16 * max(d_in * d_out for d_in, d_out in all_llm_linears(shape).values())
    phases = [(kept + recompute, grads)]

    labels = min(batch.size * batch.label_tokens, LM_HEAD_TILE_TOKENS)
    head = labels * min(shape.vocab, LM_HEAD_TILE_VOCAB) * BF16 + FP32 * batch.size * batch.label_tokens * h
    phases.append((kept, head + FINAL_NORM_BWD_FP32_BUFFERS * FP32 * tokens * h))

    if parts["vision_blocks"]:  # the LLM's activations are freed by the time backward reaches the tower
        vision = wrapped.get("vision", {})
        down = list(vision_linears(shape))[-1]  # the MLP's down projection: down_proj, fc2 or linear_fc2
        block = (
            vision_block_bytes(shape, vision, batch, *args) + full_block_bytes(shape, stage, batch)
            if checkpointing
            else 0
        )
        m, e = shape.vision_intermediate, shape.vision_embed
        vgrads = batch.patches * BF16 * (_backward_buffers(vision, down) * m + BWD_HIDDEN_BUFFERS * e)
        vgrads += shape.deepstack_mergers * DEEPSTACK_HELD_GRADS * BF16 * e * batch.patches
        phases.append((parts["vision_blocks"] + parts["vision_other"] + block, vgrads))
    return phases


def _overhead(shape: ModelShape, batch: Batch) -> int:
    pixels = batch.patches * shape.in_channels * shape.temporal_patch_size * shape.patch_size**2 * FP32
    return pixels + TOKEN_TENSORS * 8 * batch.tokens(shape) + CUBLAS_WORKSPACE_BYTES


def estimate_stage_memory(
    shape: ModelShape,
    stage: TrainingRecipe,
    batch_size: int,
    image_patches: int,
    text_tokens: int,
    checkpointing: bool,
    *,
    label_tokens: int | None = None,
    padded: bool = True,
    frozen_vision_no_grad: bool = True,
    kernels: KernelBytes = CUDA_KERNELS,
    compiled: bool = False,
    offloaded: bool = False,
    dequantized: bool = False,
) -> MemoryEstimate:
    """Peak memory of one stage (a recipe without stages) at this micro-batch.

    `image_patches` and `text_tokens` are per sample (see image_grid); `label_tokens` (default: all text
    tokens) are the positions the fused LM head scores. `frozen_vision_no_grad=False` models the worker
    before frozen towers ran under no_grad. `compiled`: the worker compiles its layers, which saves fewer
    activations (COMPILED_LLM_ACTIVATIONS, COMPILED_VISION_ACTIVATIONS) when nothing is recomputed.
    `offloaded`: with recompute, the blocks' inputs wait in host memory (OFFLOAD_RESIDENT_BLOCKS).
    `dequantized`: a 4-bit stage keeps bf16 copies of its weights (dequantized_copy_bytes), so its layers
    compile as bf16 ones do and no weight is dequantized per matmul.
    """
    if stage.stages:
        raise ValueError(f"{stage.name} is a chain; pass one of its stages or use estimate_recipe_memory")
    labels = text_tokens if label_tokens is None else label_tokens
    batch = Batch(batch_size, image_patches, text_tokens, labels, padded)
    dequantized = dequantized and stage.quantized
    fused = compiled and not checkpointing and (dequantized or not stage.quantized)
    phases = _peak_phases(
        shape, stage, batch, checkpointing, frozen_vision_no_grad, kernels, offloaded, dequantized, fused
    )
    activations, workspace = max(phases, key=sum)
    weights = weight_bytes(shape, stage.quantized) + (
        dequantized_copy_bytes(shape, stage) if dequantized else 0
    )
    trainable = trainable_state_bytes(shape, stage)
    subtotal = weights + trainable + activations + workspace
    overhead = _overhead(shape, batch) + ALLOCATOR_ROUNDING * subtotal
    return MemoryEstimate(weights, trainable, int(activations), int(workspace), int(overhead))


def estimate_recipe_memory(
    shape: ModelShape,
    recipe: TrainingRecipe,
    batch_size: int,
    image_patches: int,
    text_tokens: int,
    checkpointing: bool,
    **options,
) -> MemoryEstimate:
    """The largest stage estimate of a recipe (stages run one after the other on one device)."""
    stages = recipe.stages or (recipe,)
    estimates = [
        estimate_stage_memory(shape, stage, batch_size, image_patches, text_tokens, checkpointing, **options)
        for stage in stages
    ]
    return max(estimates, key=lambda estimate: estimate.total)


def recompute_asked(checkpointing: bool | None, offloaded: bool) -> bool | None:
    """Recompute as asked; activation offloading moves what recompute keeps, so it implies recompute.
    None: not asked, decided by fit (choose_checkpointing). The worker and the launcher's plan both ask."""
    return True if offloaded else checkpointing


def choose_checkpointing(
    shape: ModelShape,
    recipe: TrainingRecipe,
    batch_size: int,
    capacity_bytes: int,
    image_patches: int,
    text_tokens: int,
    headroom: float = HEADROOM,
    **options,
) -> bool:
    """False (no recomputation, faster) when the estimate without checkpointing fits; True otherwise."""
    plain = estimate_recipe_memory(shape, recipe, batch_size, image_patches, text_tokens, False, **options)
    return plain.total > headroom * capacity_bytes


def dequantized_copy_bytes(shape: ModelShape, recipe: TrainingRecipe) -> int:
    """What a stage's 4-bit weights take as bf16 copies dequantized once (src/models/dequantize.py): 2 bytes
    a quantized weight; 0 for a stage that loads in bf16. A chain: its largest stage."""
    stages = recipe.stages or (recipe,)
    return max(2 * parameter_counts(shape)["llm_linear"] if stage.quantized else 0 for stage in stages)


def choose_dequantized(
    shape: ModelShape,
    recipe: TrainingRecipe,
    batch_size: int,
    capacity_bytes: int,
    image_patches: int,
    text_tokens: int,
    checkpointing: bool,
    headroom: float = HEADROOM,
    **options,
) -> bool:
    """Whether a 4-bit stage keeps its weights dequantized once: when the copies fit beside the stage's
    estimate at the setting already chosen (recomputation is decided first: it is worth more)."""
    if not dequantized_copy_bytes(shape, recipe):
        return False
    options = {**options, "dequantized": True}
    stage = estimate_recipe_memory(
        shape, recipe, batch_size, image_patches, text_tokens, checkpointing, **options
    )
    return stage.total <= headroom * capacity_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.planning.memory", description=__doc__.splitlines()[0]
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-dir", help="a model directory (config.json, preprocessor_config.json)")
    where.add_argument("--shape", choices=PUBLISHED_NAMES, help="a published model's shape")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--width", type=int, default=644)
    parser.add_argument("--height", type=int, default=476)
    parser.add_argument("--text-tokens", type=int, default=100)
    args = parser.parse_args(argv)
    if args.model_dir:
        shape, limits = ModelShape.from_model_dir(args.model_dir), limits_from_config(args.model_dir)
    else:
        shape, limits = published_shape(args.shape)
    patches, _ = image_grid(args.width, args.height, *limits, shape.patch_size, shape.merge_size)
    for key, recipe in RECIPES.items():
        for checkpointing in (True, False):
            estimate = estimate_recipe_memory(
                shape, recipe, args.batch_size, patches, args.text_tokens, checkpointing
            )
            print(f"{key:15} checkpointing={'on ' if checkpointing else 'off'} {estimate.as_dict()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
