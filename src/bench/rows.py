"""One row of the training benchmark (`python -m src.bench`): a model's stage run by one variant, timed after
warm-up, with its peak memory, GPU utilisation, MFU and the planner's prediction beside it.

`bench_one(target, stage, variant, setting, args, device, env) -> dict` runs it: a core variant through the
worker's own path (src/training/run.py prepare_stage, with the RunOptions overrides in VARIANTS), a plain
one through the bare loop at its best setting that fits (src/bench/plain.py). src/bench/__main__.py plans
the rows and writes the tables; run it, not this module.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from src.bench.measure import mfu_pct, peak_gib, release_gpu_memory, round_or_none
from src.bench.targets import PROFILED_STEPS, Target, timed_stats, uniform_pct

log = logging.getLogger("bench")
PLAIN_VARIANTS = ("plain", "plain-recompute")
# RunOptions overrides per core variant; the ladder switches the training core's levers on one by one.
OFF = {
    "frozen_vision_no_grad": False,
    "fused_optimizer": False,
    "adapter_input_casts": True,
    "dataloader_workers": 0,
    "gradient_checkpointing": True,
}
VARIANTS = {
    "before": OFF,
    "+vision-no-grad": {**OFF, "frozen_vision_no_grad": True},
    "+fused-adamw": {**OFF, "frozen_vision_no_grad": True, "fused_optimizer": True},
    "+no-input-cast": {"dataloader_workers": 0, "gradient_checkpointing": True},
    "lean": {"gradient_checkpointing": True},  # = +loader-workers: every lever but the last
    "fast": {},  # + no recompute when the planner says the activations fit
    "fast-cudnn": {"cudnn_attention": False},  # fast without cuDNN's attention kernels
    "fast+varlen": {"vision_varlen_attention": True},  # fast with one vision attention call a block, eager
    "fast+host-positions": {"host_positions": True},  # fast, positions worked out on the host
    "fast+loader2": {"dataloader_workers": 2},  # fast with the 2 loader processes it had before 4
    # accelerate's blocking .to() of each batch (the default before 2026-12-01): when the host runs ahead,
    # that copy waits behind the GPU's queue and the host idles instead of preparing the next step.
    "fast-nonblocking": {"non_blocking_copies": False},
    "fast+compile": {},  # + regional torch.compile (Setting.compile)
    "fast+compile-varlen": {"vision_varlen_attention": False},  # compiled, the model's own vision attention
    "fast+compile-batched": {"vision_batched_attention": False},  # compiled, equal images varlen too
    "fast+compile-host-positions": {"host_positions": False},  # compiled, positions read from the GPU
    # compiled, the loss read back every step and each batch copied with the host waiting (the default
    # before 2026-12-01; fast+compile reads it every 10 steps, run.resolve_logging_steps)
    "fast+compile-log1": {"non_blocking_copies": False, "logging_steps": 1},
    "fast+compile4bit": {"compile_quantized": True},  # compiled, 4-bit decoder layers too (r1, r3 stage 2)
    "fast-ungrouped": {"group_by_size": False},  # plain shuffled micro-batches on images of mixed sizes
    "fast+compile-ungrouped": {"group_by_size": False},  # the same, compiled
    # 4-bit stages (r1, r3 stage 2) with bitsandbytes dequantizing on every use, not once (dequantize.py)
    "fast-dequant": {"dequantize_once": False},
    "fast+compile-dequant": {"dequantize_once": False},  # compiled: the 4-bit layers then stay eager
    "lean+compile": {"gradient_checkpointing": True},  # the memory targets, compiled
    "lean+offload": {"gradient_checkpointing": True, "offload_activations": True},  # + saved tensors on host
    "lean+offload+compile": {"gradient_checkpointing": True, "offload_activations": True},  # and compiled
}


@dataclass(frozen=True)
class Setting:
    """How a row runs its samples per optimizer step, and what the planner predicted for it."""

    micro_batch: int
    grad_accum: int
    checkpointing: bool
    compile: bool = False
    predicted_step_s: float | None = None
    dequantized: bool | None = None  # a 4-bit stage's bf16 copies as planned (None: the core's own rule)

    def label(self) -> str:
        return f"{self.micro_batch}x{self.grad_accum} recompute {'on' if self.checkpointing else 'off'}" + (
            " compiled" if self.compile else ""
        )


def bench_one(target: Target, stage, variant: str, setting: Setting | None, args, device, env) -> dict:
    """One (model, stage, variant): steps timed after warm-up, peak memory, utilisation, MFU, compile."""
    from src.bench.measure import median
    from src.training.compile import compile_report, reset_compile_state

    release_gpu_memory()
    reset_compile_state()  # each row counts its own compilations
    started = time.monotonic()
    try:
        if variant in PLAIN_VARIANTS:
            measured = _run_plain(target, stage, variant, args, device)
        else:
            measured = _run_core(target, stage, variant, setting, args, device)
    except SkipRow as skip:
        log.warning("%s %s: skipped: %s", stage.name, variant, skip)
        return {"shape": target.label, "recipe": stage.name, "variant": variant, "skipped": str(skip)}
    setting, timer = measured.setting, measured.timer
    step_s = median(timer.measured())
    first_s = timer.first_step_s()
    n = args.samples_per_step
    stats = timed_stats(target, measured.timed_rows)
    tokens = stats["tokens"] * n
    compiled = compile_report() if setting.compile else {}
    row = {
        "shape": target.label,
        "recipe": stage.name,
        "variant": variant,
        "samples_per_step": n,
        "micro_batch": setting.micro_batch,
        "grad_accum": setting.grad_accum,
        "checkpointing": setting.checkpointing,
        "compile": setting.compile,
        "steps_measured": len(timer.measured()),
        "step_s": round_or_none(step_s, 4),
        "predicted_step_s": setting.predicted_step_s,
        "first_step_s": round_or_none(first_s, 3),
        "compile_s": round_or_none(first_s - step_s, 2) if setting.compile and step_s and first_s else None,
        "recompiles": compiled.get("recompiles"),
        "graph_breaks": compiled.get("graph_breaks"),
        "tokens_per_step": round(tokens),
        "tokens_s": round_or_none(tokens / step_s if step_s else None, 1),
        "samples_s": round_or_none(n / step_s if step_s else None, 2),
        "peak_gib": peak_gib(),
        "gpu_util_pct": measured.utilisation,
        "gpu_idle_share": measured.idle_share,
        "tried": measured.tried,
        "wall_s": round(time.monotonic() - started, 1),
        "image_sizes": target.image_sizes,
        "patches_per_sample": round(stats["patches"], 1),
        "uniform_micro_batches_pct": uniform_pct(target.patch_keys, measured.timed_rows, setting.micro_batch),
        "dequantized": measured.dequantized,
        **_predicted_and_flops(target, stats, stage, measured, variant, step_s, n, env),
    }
    release_gpu_memory()
    return row


class SkipRow(Exception):
    """A row that cannot run here (an option this checkout lacks, nothing fits): reported, not fatal."""


@dataclass
class Measured:
    setting: Setting
    timer: object  # measure.StepTimer
    utilisation: float | None
    idle_share: float | None = None
    tried: list | None = None  # the plain search's settings that ran out of memory first
    timed_rows: list[int] | None = None  # the samples of the timed steps' micro-batches, in order
    dequantized: bool = False  # a 4-bit stage ran on bf16 copies of its weights (src/models/dequantize.py)


def _timed(args, variant: str, stage, target: Target, train) -> tuple[object, float | None, float | None]:
    """Run `train(timer, total_steps)` under a fresh StepTimer, NVML sampler and, if asked, profiler."""
    from src.bench.measure import StepProfiler, StepTimer, UtilisationSampler

    sampler = UtilisationSampler()
    timer = StepTimer(args.warmup, on_warm=sampler.start, measured_steps=args.steps)
    total = args.warmup + args.steps
    timer.hooks.append(lambda done: done == total and sampler.stop())  # profiled steps are not sampled
    profiler = None
    if variant in args.profile.split(","):
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"profile-{target.label}-{stage.name}-{variant}")
        prefix = Path(args.out) / name
        profiler = StepProfiler(total, prefix, PROFILED_STEPS)
        timer.hooks.append(profiler)
        total += PROFILED_STEPS
    try:
        train(timer, total)
    finally:
        utilisation = sampler.stop()
        if profiler:
            profiler.abandon()
    idle = profiler.summary["gpu_idle_share"] if profiler and profiler.summary else None
    return timer, utilisation, idle


def _run_core(target: Target, stage, variant: str, setting: Setting, args, device) -> Measured:
    """The worker's own path: prepare_stage (collator, trainer, freeze, LoRA, quantization, compile)."""
    from src.training.options import RunOptions
    from src.training.run import prepare_stage
    from src.training.size_groups import plain_order

    out = Path(args.work) / "runs" / f"{stage.name}-{variant}"
    out.mkdir(parents=True, exist_ok=True)
    opts = RunOptions(
        model_id=str(target.model_dir), dataset=str(target.data_dir), output_dir=out, device=device
    )
    try:
        opts = replace(
            opts,
            batch_size=setting.micro_batch,
            grad_accum=setting.grad_accum,
            gradient_checkpointing=setting.checkpointing,
            save_steps=0,
            compile=setting.compile,
            dequantize_once=setting.dequantized if stage.quantized else None,
        )
    except TypeError as error:  # a RunOptions without `compile` (the worker's option not merged yet)
        raise SkipRow(f"RunOptions has no compile option here ({error})") from error
    opts = replace(opts, **VARIANTS.get(variant, {}))

    order: list[int] = []  # the first epoch's, as the trainer draws it
    dequantized: list[bool] = [False]  # what the core chose for a 4-bit stage, read off the trained model

    def train(timer, total_steps):
        run_opts = replace(opts, max_steps=total_steps)
        callbacks = [timer.as_trainer_callback()]
        prepared = prepare_stage(stage.name, stage, run_opts.model_id, run_opts, out, callbacks=callbacks)
        sampler = prepared.size_sampler
        order[:] = sampler.order(0) if sampler else plain_order(len(target.patch_keys), run_opts.seed)
        prepared.trainer.train()
        if stage.quantized:
            from src.models.dequantize import is_dequantized

            dequantized[0] = is_dequantized(prepared.trainer.model)

    timer, utilisation, idle = _timed(args, variant, stage, target, train)
    per_step = setting.micro_batch * setting.grad_accum
    timed = order[args.warmup * per_step : (args.warmup + args.steps) * per_step]
    return Measured(setting, timer, utilisation, idle, timed_rows=timed, dequantized=dequantized[0])


def plain_search_order(samples_per_step: int, recompute: tuple[bool, ...]) -> list[Setting]:
    """The bare loop's settings to try, best first: for each recompute choice in turn, micro-batches
    dividing the samples a step from the largest down (the largest that fits is the fastest)."""
    divisors = sorted((d for d in range(1, samples_per_step + 1) if samples_per_step % d == 0), reverse=True)
    return [Setting(d, samples_per_step // d, ckpt) for ckpt in recompute for d in divisors]


def _run_plain(target: Target, stage, variant: str, args, device) -> Measured:
    """The bare loop at its best setting that fits: try settings best first, skipping CUDA OOM."""
    import torch

    from src.bench.plain import batch_rows, prebuilt_batches, train_plain
    from src.models.loader import model_family
    from src.training.run import load_wrapped_model, use_cudnn_attention

    model, _ = load_wrapped_model(stage, str(target.model_dir), device, model_family(str(target.model_dir)))
    if device == "cuda":
        use_cudnn_attention(True)  # torch's default, whatever a core row before this one chose
    recompute = (True,) if variant == "plain-recompute" else (False, True)
    tried = []
    for setting in plain_search_order(args.samples_per_step, recompute):
        try:
            batches = prebuilt_batches(target.dataset, target.processor, setting.micro_batch, device)

            def train(timer, total_steps, batches=batches, setting=setting):
                train_plain(
                    model,
                    batches,
                    total_steps,
                    stage.learning_rate,
                    timer,
                    device,
                    setting.grad_accum,
                    setting.checkpointing,
                )

            timer, utilisation, idle = _timed(args, variant, stage, target, train)
            rows = batch_rows(len(target.dataset), setting.micro_batch)  # cycled, a micro-batch at a time
            micro_steps = range(
                args.warmup * setting.grad_accum, (args.warmup + args.steps) * setting.grad_accum
            )
            timed = [i for step in micro_steps for i in rows[step % len(rows)]]
            return Measured(setting, timer, utilisation, idle, tried, timed)
        except torch.cuda.OutOfMemoryError:
            log.info("%s %s: %s ran out of memory; trying the next", stage.name, variant, setting.label())
            tried.append(setting.label())
        batches = None  # the failed try's tensors go before the next one allocates
        model.zero_grad(set_to_none=True)
        release_gpu_memory()
    raise SkipRow(f"no setting of the bare loop fits (tried {', '.join(tried)})")


def _predicted_and_flops(
    target: Target, stats: dict, stage, measured: Measured, variant, step_s, samples_per_step, env
) -> dict:
    """The planner's peak for this row's micro-batch (and 4-bit weights dequantized once or not, as the row
    ran), and the model FLOPs of a step behind MFU, for samples as `stats` has them (timed_stats).

    The peak is planned as the worker plans it: every sample of a micro-batch at the data set's largest image
    (`target.largest`), which is the micro-batch that sets the peak when micro-batches are of one size, and
    an upper bound otherwise (the language model pads every sample to the longest); on images of one size
    that is the mean. The text tokens are the timed samples' mean."""
    from src.bench.measure import step_flops
    from src.planning.memory import estimate_stage_memory

    setting = measured.setting
    patches = round(stats["patches"])
    text = round(stats["tokens"] - patches // 4)
    estimate = estimate_stage_memory(
        target.memory_shape,
        stage,
        setting.micro_batch,
        max(patches, target.largest[0]),
        text,
        setting.checkpointing,
        compiled=setting.compile,
        offloaded=VARIANTS.get(variant, {}).get("offload_activations", False),
        dequantized=measured.dequantized,
    )
    flops = step_flops(target.flop_shape, stage, samples_per_step, patches, text, stats["labels"])
    return {
        "predicted_gib": round(estimate.gib, 2),
        "step_flops": round(flops),
        "mfu_pct": mfu_pct(flops, step_s, env["bf16_peak_tflops"]),
    }
