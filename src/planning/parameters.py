"""A Qwen2-VL / Qwen2.5-VL model as the planners see it (torch-free): its shape, read from config.json, and
what it holds: the linears of each part, the parameters per part, and the linears LoRA wraps in a stage.
src/planning/memory.py turns these into bytes, src/planning/step_time.py into seconds.

    from src.planning.parameters import ModelShape, parameter_counts
    parameter_counts(ModelShape.from_model_dir(model_dir))  # {"llm_linear": ..., "llm_other": ..., ...}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from src.contract.families import FAMILIES, default_targets
from src.recipes import TrainingRecipe


@dataclass(frozen=True)
class ModelShape:
    """Everything the estimate needs from a Qwen2-VL / Qwen2.5-VL config.json."""

    family: str  # "qwen2_vl" | "qwen2_5_vl"
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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def merger_hidden(self) -> int:
        return self.vision_embed * self.merge_size**2

    @property
    def vision_gated(self) -> bool:
        return self.family == "qwen2_5_vl"  # SwiGLU MLP and RMSNorm in the vision blocks

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """Both layouts: transformers 5 (nested text_config) and older checkpoints (text fields on top)."""
        text = {**config, **(config.get("text_config") or {})}
        vision = config.get("vision_config") or {}
        family = config.get("model_type", "")
        if family not in FAMILIES:  # a bare config: Qwen2.5-VL's vision tower names its width hidden_size
            family = "qwen2_5_vl" if "out_hidden_size" in vision else "qwen2_vl"
        if family == "qwen2_5_vl":
            embed, inter = vision.get("hidden_size", 1280), vision.get("intermediate_size", 3420)
        else:
            embed = vision.get("embed_dim", 1280)
            inter = int(embed * vision.get("mlp_ratio", 4))
        return cls(
            family=family,
            hidden=text["hidden_size"],
            intermediate=text["intermediate_size"],
            layers=text["num_hidden_layers"],
            heads=text["num_attention_heads"],
            kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            vocab=text["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_depth=vision.get("depth", 32),
            vision_embed=embed,
            vision_heads=vision.get("num_heads", 16),
            vision_intermediate=inter,
            patch_size=vision.get("patch_size", 14),
            merge_size=vision.get("spatial_merge_size", 2),
            temporal_patch_size=vision.get("temporal_patch_size", 2),
            in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
        )

    @classmethod
    def from_model_dir(cls, path) -> ModelShape:
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))


def llm_linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one decoder layer."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def vision_linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one vision block."""
    e, m = shape.vision_embed, shape.vision_intermediate
    mlp = (
        {"gate_proj": (e, m), "up_proj": (e, m), "down_proj": (m, e)}
        if shape.vision_gated
        else {"fc1": (e, m), "fc2": (m, e)}
    )
    return {"qkv": (e, 3 * e), "proj": (e, e), **mlp}


def merger_linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    d = shape.merger_hidden
    return {"0": (d, d), "2": (d, shape.hidden)}


PART_LINEARS = {"llm": llm_linears, "vision": vision_linears, "merger": merger_linears}


def matrix_params(linears: dict[str, tuple[int, int]]) -> int:
    return sum(d_in * d_out for d_in, d_out in linears.values())


def vision_block_params(shape: ModelShape) -> int:
    e = shape.vision_embed
    block_biases = sum(d_out for _, d_out in vision_linears(shape).values())
    block_norms = 2 * e if shape.vision_gated else 4 * e  # RMSNorm weight, or LayerNorm weight and bias
    return matrix_params(vision_linears(shape)) + block_biases + block_norms


def merger_params(shape: ModelShape) -> int:
    e = shape.vision_embed  # linears, their biases, and the norm in front (ln_q)
    return (
        matrix_params(merger_linears(shape))
        + shape.merger_hidden
        + shape.hidden
        + (e if shape.vision_gated else 2 * e)
    )


def parameter_counts(shape: ModelShape) -> dict[str, int]:
    """Parameters per part; "llm_linear" is what a 4-bit load quantizes (decoder-layer weight matrices)."""
    h, e = shape.hidden, shape.vision_embed
    llm_linear = shape.layers * matrix_params(llm_linears(shape))
    llm_rest = shape.layers * (h + 2 * shape.kv_dim + 2 * h) + h  # q/k/v biases, two norms; final norm
    embeddings = shape.vocab * h * (1 if shape.tied_embeddings else 2)
    vision = shape.vision_depth * vision_block_params(shape)
    patch_embed = e * shape.in_channels * shape.temporal_patch_size * shape.patch_size**2
    merger = merger_params(shape)
    return {
        "llm_linear": llm_linear,
        "llm_other": llm_rest + embeddings,
        "vision": vision + patch_embed + merger,
    }


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
    """Trainable parameters: rank * (in + out) per wrapped linear, per layer."""
    repeats = {"llm": shape.layers, "vision": shape.vision_depth, "merger": 1}
    return sum(
        repeats[part] * stage.lora_rank * (d_in + d_out)
        for part, linears in lora_targets(shape, stage).items()
        for d_in, d_out in linears.values()
    )
