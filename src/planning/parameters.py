"""A Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 model as the planners see it (torch-free): its shape, read
from config.json, and what it holds: the linears of each part, the parameters per part, and the linears LoRA
wraps in a stage. src/planning/memory.py turns these into bytes, src/planning/step_time.py into seconds.

    from src.planning.parameters import ModelShape, parameter_counts
    parameter_counts(ModelShape.from_model_dir(model_dir))  # {"llm_linear": ..., "llm_other": ..., ...}

What the newer families change (each checked against transformers' own modules by the parameter counts of
tests/unit/src/planning/test_parameters.py):
  * Qwen3-VL and Qwen3.5 vision: patch 16, a learned position table (`pos_embed`), an ungated MLP named
    linear_fc1/linear_fc2, the merger's linears named the same, and a merger output width of its own
    (`out_hidden_size`). Qwen3-VL adds DeepStack: one more merger per `deepstack_visual_indexes` entry (its
    norm over the merged width), whose outputs are added to the first LLM layers' hidden states.
  * Their LLMs: an explicit head_dim (heads x head_dim need not be the hidden width), q_norm and k_norm, no
    attention biases. Qwen3.5 mixes Gated DeltaNet layers ("linear_attention") with attention layers whose
    q_proj is twice as wide (query and an output gate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from src.contract.families import FAMILIES, default_targets
from src.recipes import TrainingRecipe

QWEN3_FAMILIES = ("qwen3_vl", "qwen3_5")
FULL_ATTENTION, LINEAR_ATTENTION = "full_attention", "linear_attention"


@dataclass(frozen=True)
class DeltaNetShape:
    """Qwen3.5's Gated DeltaNet layers (layer_types "linear_attention"): how many, and their head widths."""

    layers: int
    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int = 4

    @property
    def key_dim(self) -> int:
        return self.key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """in_proj_qkv's output: queries, keys and values, which the causal conv1d mixes."""
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class ModelShape:
    """Everything the estimate needs from a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 config.json."""

    family: str  # a FAMILIES value
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    vision_depth: int
    vision_embed: int
    vision_heads: int
    vision_intermediate: int
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    explicit_head_dim: int = 0  # the config's head_dim (Qwen3 families); 0: hidden / heads
    attention_bias: bool = True  # Qwen2's q/k/v biases; Qwen3's config says (none in the published ones)
    rotary_fraction: float = 1.0  # the share of a head RoPE rotates (Qwen3.5: partial_rotary_factor 0.25)
    vision_out: int = 0  # the merger's output width (out_hidden_size); 0: the LLM's hidden width
    vision_positions: int = 0  # rows of the learned position table (Qwen3 towers' num_position_embeddings)
    deepstack_mergers: int = 0  # Qwen3-VL: len(deepstack_visual_indexes)
    linear_attention: DeltaNetShape | None = None  # Qwen3.5's Gated DeltaNet layers

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.heads

    @property
    def rotary_dim(self) -> int:
        """The width of each head RoPE rotates: its cos and sin tables."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def q_dim(self) -> int:
        """Width of the attention's queries and output (the hidden width in Qwen2, not always in Qwen3)."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def qk_norm(self) -> bool:
        return self.family in QWEN3_FAMILIES  # RMSNorm over each query and key head

    @property
    def attention_gate(self) -> bool:
        return self.family == "qwen3_5"  # q_proj also yields a sigmoid gate on the attention output

    @property
    def merger_hidden(self) -> int:
        return self.vision_embed * self.merge_size**2

    @property
    def merger_out(self) -> int:
        return self.vision_out or self.hidden

    @property
    def vision_gated(self) -> bool:
        return self.family == "qwen2_5_vl"  # SwiGLU MLP and RMSNorm in the vision blocks

    @property
    def mergers(self) -> int:
        """The merger and Qwen3-VL's DeepStack mergers: the part "merger" (src/contract/families.py)."""
        return 1 + self.deepstack_mergers

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """Both layouts: transformers 5 (nested text_config) and older checkpoints (text fields on top)."""
        text = {**config, **(config.get("text_config") or {})}
        vision = config.get("vision_config") or {}
        family = config.get("model_type", "")
        if family not in FAMILIES:  # a bare config: Qwen2.5-VL's vision tower names its width hidden_size
            family = "qwen2_5_vl" if "out_hidden_size" in vision else "qwen2_vl"
        return cls(
            family=family,
            hidden=text["hidden_size"],
            intermediate=text["intermediate_size"],
            layers=text["num_hidden_layers"],
            heads=text["num_attention_heads"],
            kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            vocab=text["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            **_text_fields(family, text),
            **_vision_fields(family, vision, text["hidden_size"]),
        )

    @classmethod
    def from_model_dir(cls, path) -> ModelShape:
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))


def _text_fields(family: str, text: dict) -> dict:
    """The LLM fields the Qwen3 families add; Qwen2's defaults otherwise."""
    if family not in QWEN3_FAMILIES:
        return {}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    # transformers' Qwen3.5 config rotates a quarter of each head unless told otherwise
    partial = text.get("partial_rotary_factor", 0.25 if family == "qwen3_5" else 1.0)
    return {
        "explicit_head_dim": text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        "attention_bias": bool(text.get("attention_bias", False)),
        "rotary_fraction": rope.get("partial_rotary_factor", partial),
        "linear_attention": _delta_net(family, text),
    }


def _delta_net(family: str, text: dict) -> DeltaNetShape | None:
    if family != "qwen3_5":
        return None
    layers = text["num_hidden_layers"]
    interval = text.get("full_attention_interval", 4)  # transformers' default layer_types
    kinds = text.get("layer_types") or [
        FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(layers)
    ]
    return DeltaNetShape(
        layers=sum(kind == LINEAR_ATTENTION for kind in kinds),
        key_heads=text.get("linear_num_key_heads", 16),
        value_heads=text.get("linear_num_value_heads", 32),
        key_head_dim=text.get("linear_key_head_dim", 128),
        value_head_dim=text.get("linear_value_head_dim", 128),
        conv_kernel=text.get("linear_conv_kernel_dim", 4),
    )


def _vision_fields(family: str, vision: dict, llm_hidden: int) -> dict:
    """The tower's fields; transformers' defaults of each family where config.json leaves one out.
    The merger's output width is Qwen2-VL's vision `hidden_size` (its width is `embed_dim`), the others'
    `out_hidden_size`; published models set it to the LLM's hidden width."""
    qwen3 = family in QWEN3_FAMILIES
    if family == "qwen2_vl":
        embed = vision.get("embed_dim", 1280)
        sizes = {
            "vision_embed": embed,
            "vision_intermediate": int(embed * vision.get("mlp_ratio", 4)),
            "vision_out": vision.get("hidden_size", llm_hidden),
        }
    else:
        embed, inter = (1152, 4304) if qwen3 else (1280, 3420)
        sizes = {
            "vision_embed": vision.get("hidden_size", embed),
            "vision_intermediate": vision.get("intermediate_size", inter),
            "vision_out": vision.get("out_hidden_size", llm_hidden),
        }
    fields = {
        **sizes,
        "vision_depth": vision.get("depth", 27 if qwen3 else 32),
        "vision_heads": vision.get("num_heads", 16),
        "patch_size": vision.get("patch_size", 16 if qwen3 else 14),
        "merge_size": vision.get("spatial_merge_size", 2),
        "temporal_patch_size": vision.get("temporal_patch_size", 2),
        "in_channels": vision.get("in_channels", vision.get("in_chans", 3)),
    }
    if qwen3:
        fields["vision_positions"] = vision.get("num_position_embeddings", 2304)
    if family == "qwen3_vl":
        fields["deepstack_mergers"] = len(vision.get("deepstack_visual_indexes", (8, 16, 24)))
    return fields


# --- the linears of each part: (in, out) per module name -------------------------------------------------


def llm_layer_counts(shape: ModelShape) -> dict[str, int]:
    """Decoder layers of each kind: all attention, except Qwen3.5's Gated DeltaNet layers."""
    linear = shape.linear_attention.layers if shape.linear_attention else 0
    counts = {FULL_ATTENTION: shape.layers - linear, LINEAR_ATTENTION: linear}
    return {kind: count for kind, count in counts.items() if count}


def _mlp_linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    h, i = shape.hidden, shape.intermediate
    return {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def llm_linears(shape: ModelShape, kind: str = FULL_ATTENTION) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one decoder layer of `kind`."""
    h = shape.hidden
    if kind == LINEAR_ATTENTION:
        delta = shape.linear_attention
        assert delta is not None, "only Qwen3.5 has linear-attention layers"
        mixer = {
            "in_proj_qkv": (h, delta.conv_dim),
            "in_proj_z": (h, delta.value_dim),  # the gate of the output norm
            "in_proj_b": (h, delta.value_heads),  # one write strength a value head
            "in_proj_a": (h, delta.value_heads),  # one decay a value head
            "out_proj": (delta.value_dim, h),
        }
    else:
        q_out = shape.q_dim * (2 if shape.attention_gate else 1)
        mixer = {
            "q_proj": (h, q_out),
            "k_proj": (h, shape.kv_dim),
            "v_proj": (h, shape.kv_dim),
            "o_proj": (shape.q_dim, h),
        }
    return {**mixer, **_mlp_linears(shape)}


def all_llm_linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """Every linear name a decoder layer of this model may hold (the kinds share the MLP)."""
    return {name: dims for kind in llm_layer_counts(shape) for name, dims in llm_linears(shape, kind).items()}


def vision_linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one vision block."""
    e, m = shape.vision_embed, shape.vision_intermediate
    if shape.vision_gated:
        mlp = {"gate_proj": (e, m), "up_proj": (e, m), "down_proj": (m, e)}
    elif shape.family in QWEN3_FAMILIES:
        mlp = {"linear_fc1": (e, m), "linear_fc2": (m, e)}
    else:
        mlp = {"fc1": (e, m), "fc2": (m, e)}
    return {"qkv": (e, 3 * e), "proj": (e, e), **mlp}


def merger_linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """One merger's linears; Qwen3-VL's DeepStack mergers have the same."""
    d, out = shape.merger_hidden, shape.merger_out
    if shape.family in QWEN3_FAMILIES:
        return {"linear_fc1": (d, d), "linear_fc2": (d, out)}
    return {"0": (d, d), "2": (d, out)}


PART_LINEARS = {"llm": all_llm_linears, "vision": vision_linears, "merger": merger_linears}


def linear_repeats(shape: ModelShape, part: str, name: str) -> int:
    """How many modules of the part hold the linear `name`: blocks, mergers, or the layers with it."""
    if part == "vision":
        return shape.vision_depth
    if part == "merger":
        return shape.mergers
    return sum(count for kind, count in llm_layer_counts(shape).items() if name in llm_linears(shape, kind))


# --- parameters ------------------------------------------------------------------------------------------


def matrix_params(linears: dict[str, tuple[int, int]]) -> int:
    return sum(d_in * d_out for d_in, d_out in linears.values())


def vision_block_params(shape: ModelShape) -> int:
    e = shape.vision_embed
    block_biases = sum(d_out for _, d_out in vision_linears(shape).values())
    block_norms = 2 * e if shape.vision_gated else 4 * e  # RMSNorm weight, or LayerNorm weight and bias
    return matrix_params(vision_linears(shape)) + block_biases + block_norms


def _one_merger_params(shape: ModelShape, norm_width: int) -> int:
    linears = merger_linears(shape)  # linears, their biases, and the norm in front
    biases = sum(d_out for _, d_out in linears.values())
    norm = norm_width if shape.vision_gated else 2 * norm_width  # RMSNorm, or LayerNorm weight and bias
    return matrix_params(linears) + biases + norm


def deepstack_params(shape: ModelShape) -> int:
    """Qwen3-VL's DeepStack mergers: the merger's linears, each with its norm over the merged width."""
    return shape.deepstack_mergers * _one_merger_params(shape, shape.merger_hidden)


def merger_params(shape: ModelShape) -> int:
    """The part "merger": the merger (its norm over the tower's width, before the 2x2 merge) and
    Qwen3-VL's DeepStack mergers."""
    return _one_merger_params(shape, shape.vision_embed) + deepstack_params(shape)


def patch_embed_params(shape: ModelShape) -> int:
    """The Conv3d patch embedding (with a bias in the Qwen3 towers) and their learned position table."""
    e = shape.vision_embed
    conv = e * shape.in_channels * shape.temporal_patch_size * shape.patch_size**2
    qwen3 = shape.family in QWEN3_FAMILIES
    return conv + (e if qwen3 else 0) + shape.vision_positions * e


def _attention_layer_rest(shape: ModelShape) -> int:
    """An attention layer's parameters besides its linear weights: biases and the q/k head norms."""
    h, q, kv = shape.hidden, shape.q_dim, shape.kv_dim
    if not shape.qk_norm:
        return q + 2 * kv if shape.attention_bias else 0  # Qwen2: q/k/v biases, none on o_proj
    gate = 2 if shape.attention_gate else 1
    biases = gate * q + 2 * kv + h if shape.attention_bias else 0
    return biases + 2 * shape.head_dim


def _delta_layer_rest(delta: DeltaNetShape) -> int:
    """A Gated DeltaNet layer's parameters besides its linear weights: the depthwise conv, the gated
    norm over a value head, a decay (A_log) and a time-step bias (dt_bias) per value head."""
    return delta.conv_dim * delta.conv_kernel + delta.value_head_dim + 2 * delta.value_heads


def _llm_layer_rest(shape: ModelShape, kind: str) -> int:
    mixer = (
        _delta_layer_rest(shape.linear_attention)
        if kind == LINEAR_ATTENTION and shape.linear_attention
        else _attention_layer_rest(shape)
    )
    return mixer + 2 * shape.hidden  # input and post-attention RMSNorms


def part_parameter_counts(shape: ModelShape) -> dict[str, int]:
    """Parameters per part as src/contract/families.py's part_of names them (lm_head absent when tied)."""
    h = shape.hidden
    layers = sum(
        count * (matrix_params(llm_linears(shape, kind)) + _llm_layer_rest(shape, kind))
        for kind, count in llm_layer_counts(shape).items()
    )
    counts = {
        "patch_embed": patch_embed_params(shape),
        "vision": shape.vision_depth * vision_block_params(shape),
        "merger": merger_params(shape),
        "llm": layers + h + shape.vocab * h,  # the final norm and embed_tokens
    }
    if not shape.tied_embeddings:
        counts["lm_head"] = shape.vocab * h
    return counts


def parameter_counts(shape: ModelShape) -> dict[str, int]:
    """Parameters per part; "llm_linear" is what a 4-bit load quantizes (decoder-layer weight matrices)."""
    parts = part_parameter_counts(shape)
    llm_linear = sum(n * matrix_params(llm_linears(shape, k)) for k, n in llm_layer_counts(shape).items())
    return {
        "llm_linear": llm_linear,
        "llm_other": parts["llm"] + parts.get("lm_head", 0) - llm_linear,
        "vision": parts["patch_embed"] + parts["vision"] + parts["merger"],
    }


# --- what LoRA wraps -------------------------------------------------------------------------------------


def lora_targets(shape: ModelShape, stage: TrainingRecipe) -> dict[str, dict[str, tuple[int, int]]]:
    """Per trained part, the (in, out) of each linear PEFT wraps (as scoped by src/models/lora.py)."""
    modes = {"vision": stage.train_vision, "merger": stage.train_merger, "llm": stage.train_llm}
    wrapped = {}
    for part, mode in modes.items():
        if mode != "lora":
            continue
        names = stage.lora_target_modules or default_targets(part, shape.family)
        wrapped[part] = {n: dims for n, dims in PART_LINEARS[part](shape).items() if n in names}
    return wrapped


def lora_parameters(shape: ModelShape, stage: TrainingRecipe) -> int:
    """Trainable parameters: rank * (in + out) per wrapped linear, in every module that holds it."""
    return sum(
        linear_repeats(shape, part, name) * stage.lora_rank * (d_in + d_out)
        for part, linears in lora_targets(shape, stage).items()
        for name, (d_in, d_out) in linears.items()
    )
