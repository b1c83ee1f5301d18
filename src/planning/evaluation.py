"""What evaluation needs in GPU memory: the model in bf16 and, for each image of a generate() batch, its KV
cache and the prefill's transients. Torch-free, so that the launcher can reserve it for a packed job.

    from src.planning.evaluation import eval_peak_bytes
    eval_peak_bytes(shape, prompt_tokens=600, max_new_tokens=88)   # the bf16 model and one image

Evaluation loads the model in bf16 even after a 4-bit (QLoRA) training run (src/eval/predict.py
load_for_eval), so a packed job planned small for training (4-bit weights, recompute) may need more to
evaluate than to train: a packed 7B job's worker is capped at its reservation, and evaluation loads
15.5 GiB of weights there (docs/benchmarks.md, thirteenth session). The launcher reserves the larger of the
two (recipe_runner/planning/estimates.py); evaluation then sizes its batches from what is left.
"""

from __future__ import annotations

from src.planning.memory import BF16, FP32, weight_bytes
from src.planning.parameters import ModelShape


def eval_bytes_per_image(shape: ModelShape, prompt_tokens: int, max_new_tokens: int) -> int:
    """GPU bytes one more image in a generate() batch needs, in bf16.

    The KV cache of prompt + answer (2 x layers x kv_heads x head_dim x 2 bytes a token), the prefill's
    largest transient per prompt token (one decoder layer's MLP and hidden states, every image at once),
    the vision tower's per prompt token (4 patches a token) and the last position's fp32 logits.
    """
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * BF16
    prefill_per_token = BF16 * (3 * shape.intermediate + 6 * shape.hidden)
    vision_per_token = shape.merge_size**2 * BF16 * (4 * shape.vision_embed + 2 * shape.vision_intermediate)
    return (
        (prompt_tokens + max_new_tokens) * kv_per_token
        + prompt_tokens * (prefill_per_token + vision_per_token)
        + FP32 * shape.vocab
    )


def eval_peak_bytes(shape: ModelShape, prompt_tokens: int, max_new_tokens: int) -> int:
    """The least GPU memory evaluation runs in: the bf16 model and a batch of one image."""
    return weight_bytes(shape, quantized=False) + eval_bytes_per_image(shape, prompt_tokens, max_new_tokens)
