"""What the benchmark measures around a training loop: step times, GPU utilisation, the card's
bf16 peak, and the model FLOPs of one step (for MFU).

FLOPs are counted from the config, per sample (Kaplan-style 2 FLOPs per weight per token):
  forward   2 * (LLM layer weights) * LLM tokens + causal attention 2 * S^2 * width per layer
            + 2 * (vision block weights) * patches + full attention 4 * P^2 * width per block
            + 2 * hidden * vocab per label token (TRL's fused head projects only those)
  backward  the forward again (input gradients) for every part the gradient flows through:
            the LLM always (every recipe trains in or below it), the vision tower only when it
            or the merger trains; attention backward counts twice. LoRA's own weight gradients
            are under 1% and left out. Recomputation (gradient checkpointing) is not counted:
            MFU is model FLOPs, so recomputing lowers it, as it should.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass


class StepTimer:
    """Wall-clock time of each optimizer step, synchronised with the GPU at the step's end."""

    def __init__(self, warmup: int, on_warm=None):
        self.warmup, self.on_warm = warmup, on_warm
        self.ends: list[float] = []
        self.started: float | None = None

    def begin(self) -> None:
        self.started = time.perf_counter()

    def step_done(self) -> None:
        _synchronize()
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup and self.on_warm:
            self.on_warm()

    def measured(self) -> list[float]:
        """Durations of the steps after warm-up (each includes its data loading and logging)."""
        edges = [self.started, *self.ends]
        durations = [b - a for a, b in zip(edges, edges[1:], strict=False)]
        return durations[self.warmup :]

    def as_trainer_callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                _synchronize()
                timer.begin()

            def on_step_end(self, args, state, control, **kwargs):
                timer.step_done()

        return _Callback()


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class UtilisationSampler:
    """Mean NVML GPU utilisation (% of time a kernel ran) between start() and stop()."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = _nvml_handle()

    def start(self) -> None:
        if self._handle is None or self._thread:
            return
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import pynvml

        while not self._stop.is_set():
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self._stop.wait(self.interval_s)

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        return round(statistics.fmean(self.samples), 1) if self.samples else None


def _nvml_handle():
    """The NVML handle of CUDA device 0 (found by UUID: NVML ignores CUDA_VISIBLE_DEVICES)."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = f"GPU-{torch.cuda.get_device_properties(0).uuid}"
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:  # no NVML: utilisation is reported as unknown, the rest still runs
        return None


def bf16_peak_tflops(size: int = 8192, reps: int = 10) -> float | None:
    """The card's measured dense bf16 matmul rate (median of `reps` after warm-up), in TFLOP/s."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return round(2 * size**3 / statistics.median(times) / 1e12, 1)


@dataclass(frozen=True)
class FlopShape:
    """Weights per model part and the widths attention FLOPs need, from a meta-device model."""

    llm_weights: int  # all decoder layers (embeddings excluded: a lookup, not a matmul)
    vision_weights: int  # patch embedding and blocks, applied per patch
    merger_weights: int  # applied per merged token (4 patches)
    llm_layers: int
    llm_attention_width: int
    vision_depth: int
    vision_width: int
    hidden: int
    vocab: int
    merge: int

    @classmethod
    def from_model_dir(cls, model_dir) -> FlopShape:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        from src.models.freeze import part_of

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        weights: dict[str, int] = {}
        for name, param in model.named_parameters():
            part = "embed" if "embed_tokens" in name else part_of(name)
            weights[part] = weights.get(part, 0) + param.numel()
        text, vision = config.text_config, config.vision_config
        return cls(
            llm_weights=weights.get("llm", 0),
            vision_weights=weights.get("vision", 0) + weights.get("patch_embed", 0),
            merger_weights=weights.get("merger", 0),
            llm_layers=text.num_hidden_layers,
            llm_attention_width=text.num_attention_heads * (text.hidden_size // text.num_attention_heads),
            vision_depth=vision.depth,
            vision_width=getattr(vision, "embed_dim", None) or vision.hidden_size,
            hidden=text.hidden_size,
            vocab=text.vocab_size,
            merge=vision.spatial_merge_size,
        )


def step_flops(shape: FlopShape, stage, batch_size: int, patches: int, text_tokens: int, label_tokens: int):
    """Model FLOPs of one optimizer step of `batch_size` one-image samples (module docstring)."""
    from src.models.freeze import vision_trains

    llm_tokens = text_tokens + patches // shape.merge**2
    llm_fwd = 2 * shape.llm_weights * llm_tokens
    llm_attn = 2 * llm_tokens**2 * shape.llm_attention_width * shape.llm_layers
    head = 2 * shape.hidden * shape.vocab * label_tokens
    vision_fwd = 2 * (shape.vision_weights + shape.merger_weights // shape.merge**2) * patches
    vision_attn = 4 * patches**2 * shape.vision_width * shape.vision_depth
    forward = llm_fwd + llm_attn + head + vision_fwd + vision_attn
    backward = llm_fwd + 2 * llm_attn + head
    if vision_trains(stage):
        backward += vision_fwd + 2 * vision_attn
    return float(batch_size * (forward + backward))
