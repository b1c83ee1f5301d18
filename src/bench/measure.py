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
    """Duration of each optimizer step, on the GPU's own clock where there is one.

    At each step's end a CUDA event is recorded in the stream: the time between two events is the
    step as the GPU lived it, its idle gaps included, and no step waits for the GPU. (Until
    2026-12-01 the timer synchronised at every step's end. That made the GPU idle at every step
    boundary while the host fetched the next batch and launched its first kernels, which a real run,
    whose host runs ahead, does not do; it cost the core, with more host work per step, more than
    the bare loop.) The host waits for the GPU only at the first step's end (its wall time is the
    compile cost) and at the last measured step's. Without CUDA, each step's wall time.

    `hooks` are called with the number of steps done after each step (the profiler starts and
    stops through them, so the plain loop and the trainer are profiled the same way).
    """

    def __init__(self, warmup: int, on_warm=None, measured_steps: int | None = None):
        self.warmup, self.on_warm, self.measured_steps = warmup, on_warm, measured_steps
        self.ends: list[float] = []  # host time after each step (after a sync where there is one)
        self.events: list = []  # a CUDA event at the start and after each step, when on a GPU
        self.started: float | None = None
        self.hooks: list = []

    def begin(self) -> None:
        self.started = time.perf_counter()
        self.events = [_record_event()] if _cuda() else []

    def step_done(self) -> None:
        if self.events:
            self.events.append(_record_event())
        done = len(self.ends) + 1
        last_measured = self.warmup + self.measured_steps if self.measured_steps is not None else None
        if done in (1, last_measured) or not self.events:
            synchronize()
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup and self.on_warm:
            self.on_warm()
        for hook in self.hooks:
            hook(len(self.ends))

    def first_step_s(self) -> float | None:
        """The first step's duration: compilation, allocator growth and cold caches land here."""
        return self.ends[0] - self.started if self.ends and self.started is not None else None

    def measured(self) -> list[float]:
        """Durations of the steps after warm-up (each includes its data loading and logging), up to
        `measured_steps` of them (steps after those, such as profiled ones, are not counted)."""
        if self.events:
            synchronize()  # every event recorded so far has happened
            durations = [a.elapsed_time(b) / 1000 for a, b in zip(self.events, self.events[1:], strict=False)]
        else:
            edges = [self.started, *self.ends]
            durations = [b - a for a, b in zip(edges, edges[1:], strict=False)]
        end = None if self.measured_steps is None else self.warmup + self.measured_steps
        return durations[self.warmup : end]

    def as_trainer_callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                synchronize()
                timer.begin()

            def on_step_end(self, args, state, control, **kwargs):
                timer.step_done()

        return _Callback()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _record_event():
    import torch

    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def synchronize() -> None:
    """Wait for the GPU's queued work, where there is a GPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def gpu_idle_share(intervals: list[tuple[float, float]]) -> float | None:
    """Share of the window from the first kernel's start to the last kernel's end in which no
    kernel ran (the gaps between kernels: launch overhead, host syncs, Python), from 0 to 1."""
    if not intervals:
        return None
    ordered = sorted(intervals)
    window = max(end for _, end in ordered) - ordered[0][0]
    busy, reach = 0.0, ordered[0][0]
    for start, end in ordered:  # the union of the intervals: overlapping kernels (streams) count once
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return round(1 - busy / window, 4) if window > 0 else None


class StepProfiler:
    """torch.profiler over `steps` steps once `start_after` steps are done, as a StepTimer hook;
    writes `<prefix>.txt` (top-20 CUDA-time and CPU-time tables) and `<prefix>.json` (GPU idle share).
    The bench profiles steps after the measured ones, so profiling never slows a measured step."""

    def __init__(self, start_after: int, prefix, steps: int = 2):
        self.warmup, self.prefix, self.steps = start_after, str(prefix), steps
        self.profiler = None
        self.syncs = SyncSites()
        self.summary: dict | None = None

    def __call__(self, steps_done: int) -> None:
        import torch

        if steps_done == self.warmup and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.syncs = SyncSites()
            self.syncs.start()
            self.profiler.start()
        elif steps_done == self.warmup + self.steps and self.profiler is not None:
            synchronize()  # the profiled steps' kernels have all run before the trace closes
            self.profiler.stop()
            self.syncs.stop()
            self._export()
            self.profiler = None

    def abandon(self) -> None:
        """Stop a profiler left running by a run that ended early (out of memory)."""
        if self.profiler is not None:
            self.profiler.stop()
            self.syncs.stop()
            self.profiler = None

    def _export(self) -> None:
        import json
        from pathlib import Path

        averages = self.profiler.key_averages()
        cuda_key = "self_cuda_time_total" if _has_cuda_events(averages) else "self_cpu_time_total"
        text = averages.table(sort_by=cuda_key, row_limit=40, max_name_column_width=90)
        text += "\n" + averages.table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60)
        kernels = kernel_intervals(self.profiler)
        self.summary = {
            "steps": self.steps,
            "kernels": len(kernels),
            "gpu_idle_share": gpu_idle_share(kernels),
            "gpu_busy_s": round(sum(end - start for start, end in kernels) / 1e6, 4),
            "gpu_ms_by_kind": gpu_time_by_kind(self.profiler),
            "idle_gaps": idle_gaps(kernels, host_ops(self.profiler)),
            "host_syncs": self.syncs.total,
            "sync_sites": self.syncs.top(),
        }
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        Path(self.prefix + ".txt").write_text(text)
        Path(self.prefix + ".json").write_text(json.dumps(self.summary, indent=1) + "\n")


def _has_cuda_events(averages) -> bool:
    return any(
        getattr(event, "device_type", None) is not None and "CUDA" in str(event.device_type)
        for event in averages
    )


# Kernel name fragments -> kind, first match wins: where the GPU's time goes, in a few words.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("optimizer", ("multi_tensor", "adam")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "splitk")),
    ("copy/cast", ("copy", "memcpy", "memset", "cast", "catarray", "cat_")),
    ("reduce/norm", ("reduce", "norm", "softmax", "cross_entropy")),
    ("triton (compiled)", ("triton",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return "other"


def gpu_time_by_kind(profiler) -> dict[str, float]:
    """Milliseconds of GPU kernel time per kind (KERNEL_KINDS), largest first."""
    totals: dict[str, float] = {}
    for event in profiler.events():
        if "CUDA" in str(getattr(event, "device_type", "")):
            kind = kernel_kind(event.name)
            totals[kind] = totals.get(kind, 0.0) + (event.time_range.end - event.time_range.start) / 1e3
    return {kind: round(ms, 1) for kind, ms in sorted(totals.items(), key=lambda item: -item[1])}


class SyncSites:
    """Where the host waited for the GPU during the profiled steps: torch's sync debug mode warns at
    each synchronising call (`.item()`, `.tolist()`, a blocking copy); the warnings are tallied by the
    Python line that made them. A host sync empties the GPU's queue, so each one exposes launch latency."""

    def __init__(self):
        self.sites: dict[str, int] = {}
        self._catcher = None

    def start(self) -> None:
        import warnings

        import torch

        if not torch.cuda.is_available():
            return
        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        import torch

        if self._catcher is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        for record in self._records:
            if "synchroniz" in str(record.message):
                site = f"{record.filename}:{record.lineno}"
                self.sites[site] = self.sites.get(site, 0) + 1
        self._catcher.__exit__(None, None, None)
        self._catcher = None

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def top(self, count: int = 15) -> list[tuple[str, int]]:
        return sorted(self.sites.items(), key=lambda item: -item[1])[:count]


def kernel_intervals(profiler) -> list[tuple[float, float]]:
    """(start, end) in microseconds of every GPU kernel and copy the profiler recorded."""
    intervals = []
    for event in profiler.events():
        if "CUDA" in str(getattr(event, "device_type", "")):
            intervals.append((event.time_range.start, event.time_range.end))
    return intervals


def host_ops(profiler) -> list[tuple[float, float, str]]:
    """(start, end, name) in microseconds of every top-level host operation the profiler recorded."""
    return [
        (event.time_range.start, event.time_range.end, event.name)
        for event in profiler.events()
        if "CUDA" not in str(getattr(event, "device_type", "")) and getattr(event, "cpu_parent", None) is None
    ]


LONG_GAP_US = 1000.0  # a GPU gap this long is the host doing something else, not launch latency


def idle_gaps(kernels: list[tuple[float, float]], ops: list[tuple[float, float, str]], top: int = 8) -> dict:
    """Where the GPU's idle time lies: in gaps of LONG_GAP_US or more (the host busy elsewhere: a sync,
    data, Python) or in short ones (launch latency between queued kernels), and the longest gaps, each
    with the host operations that overlapped it most (name, overlap ms)."""
    gaps, reach = [], None
    for start, end in sorted(kernels):
        if reach is not None and start > reach:
            gaps.append((reach, start))
        reach = end if reach is None else max(reach, end)
    long_gaps = [gap for gap in gaps if gap[1] - gap[0] >= LONG_GAP_US]
    longest = sorted(long_gaps, key=lambda gap: gap[0] - gap[1])[:top]
    return {
        "long_ms": round(sum(end - start for start, end in long_gaps) / 1000, 2),
        "long_count": len(long_gaps),
        "short_ms": round(sum(end - start for start, end in gaps if end - start < LONG_GAP_US) / 1000, 2),
        "longest": [
            {"ms": round((end - start) / 1000, 2), "host": _overlapping(start, end, ops)}
            for start, end in longest
        ],
    }


def _overlapping(start: float, end: float, ops: list[tuple[float, float, str]], top: int = 3) -> list:
    """The `top` host operations that overlapped (start, end) most: [name, overlap ms]."""
    overlap: dict[str, float] = {}
    for op_start, op_end, name in ops:
        shared = min(end, op_end) - max(start, op_start)
        if shared > 0:
            overlap[name] = overlap.get(name, 0.0) + shared
    ranked = sorted(overlap.items(), key=lambda item: -item[1])[:top]
    return [[name, round(us / 1000, 2)] for name, us in ranked]


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

        from src.contract.families import part_of

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        weights: dict[str, int] = {}
        for name, param in model.named_parameters():
            part = "embed" if "embed_tokens" in name else part_of(name)
            weights[part] = weights.get(part, 0) + param.numel()
        text, vision = config.text_config, config.vision_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            llm_weights=weights.get("llm", 0),
            vision_weights=weights.get("vision", 0) + weights.get("patch_embed", 0),
            merger_weights=weights.get("merger", 0),
            llm_layers=text.num_hidden_layers,
            llm_attention_width=text.num_attention_heads * head_dim,
            vision_depth=vision.depth,
            vision_width=getattr(vision, "embed_dim", None) or vision.hidden_size,
            hidden=text.hidden_size,
            vocab=text.vocab_size,
            merge=vision.spatial_merge_size,
        )


def step_flops(shape: FlopShape, stage, batch_size: int, patches: int, text_tokens: int, label_tokens: int):
    """Model FLOPs of one optimizer step of `batch_size` one-image samples (module docstring)."""
    from src.contract.families import vision_trains

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


def mfu_pct(flops: float, step_s: float | None, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation of a step, in percent of the card's measured bf16 peak."""
    return round(100 * flops / step_s / (peak_tflops * 1e12), 1) if flops and step_s and peak_tflops else None


def release_gpu_memory() -> None:
    """Free what the last row left on the card and restart its peak count, so each row starts alike."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def round_or_none(value, digits):
    return None if value is None else round(value, digits)
