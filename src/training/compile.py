"""Regional compilation: `torch.compile` each Qwen2-VL decoder layer and vision block, LoRA included.

Used by the training core (RunOptions.compile) and the benchmark; from Python:

    from src.training.compile import compile_regions, compile_report
    compiled = compile_regions(peft_model)          # in place; returns how many regions
    ...train...
    print(compile_report())                          # frames compiled, recompiles, graph breaks

Why regions and not the whole model: the layers of one kind share their Python code, so Dynamo
compiles one layer and reuses the compiled code for the others (a first step of seconds, not
minutes), and everything between the layers (data-dependent image splitting, M-RoPE index
building, TRL's fused loss) stays eager where it graph-breaks anyway. Inside a region, the LoRA
matmuls, dropout, norms and activations fuse into fewer, bigger kernels: fewer launches is what a
launch-bound step needs (docs/benchmarks.md: the GPU was busy 60-66% of a step).

`nn.Module.compile` (not `torch.compile(module)`) compiles in place: the module keeps its class,
its parameter names and its state_dict keys, so PEFT saving and merging see the same model.
Gradient checkpointing keeps working: the non-reentrant checkpoint either wraps the compiled
region or is traced into it (transformers 5 checkpoints `forward`, inside `__call__`), and both
recompute the same compiled code.

`dynamic=True` compiles with symbolic sizes from the first call, so images of another size, a
different sequence length or the last short batch reuse the same code instead of recompiling.
Decoder layers holding bitsandbytes 4-bit weights (QLoRA) are left eager by default; the vision tower
(never quantized) is still compiled. Compiling them too (`include_quantized`, the worker's
RunOptions.compile_quantized) traced without a graph break on an H200 (bitsandbytes 0.50, torch 2.11)
and made a 2B r1 step 19% faster than leaving them eager, but it compiled for 129 s instead of 19 s:
one run, repaid only after about 1,200 steps (docs/benchmarks.md), so it is not the default yet.
Layers whose 4-bit weights were dequantized once (src/models/dequantize.py) trace as bf16 layers do and
are compiled with the others.
"""

from __future__ import annotations

import logging
import re

from src.models.dequantize import is_dequantized

log = logging.getLogger(__name__)

# ModuleLists whose items are the repeated regions (transformers 5 names; the PEFT wrapper adds a prefix).
REGION_LISTS = {
    "decoder layer": re.compile(r"(^|\.)language_model\.layers$"),
    "vision block": re.compile(r"(^|\.)visual\.blocks$"),
}
QUANTIZED_LAYER_NAMES = {"Linear4bit", "Linear8bitLt", "Params4bit", "Int8Params"}
# Each distinct code object may be compiled this many times (shapes, grad mode, train/eval) before
# Dynamo gives up and runs it eagerly. The default (8) is tight once a model has two region kinds
# each seen with and without grad, in training and evaluation.
RECOMPILE_LIMIT = 32
COMPILATION_METRICS_KEPT = 4096  # Dynamo keeps 64 by default; compile_report counts from them


def configure_dynamo() -> None:
    """Compiler settings that suit repeated layers with varying shapes (idempotent).

    - ints stored on modules (a layer's index) become symbolic instead of one compile per layer;
    - a higher recompile limit, so train/eval and grad/no-grad variants never fall back to eager;
    - keep every compilation's record, so compile_report can count recompilations.
    """
    import torch._dynamo

    config = torch._dynamo.config
    config.allow_unspec_int_on_nn_module = True
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; both exist as aliases
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            break
    utils = torch._dynamo.utils
    if hasattr(utils, "set_compilation_metrics_limit"):
        utils.set_compilation_metrics_limit(COMPILATION_METRICS_KEPT)


def find_regions(model) -> dict[str, list]:
    """The repeated layers of a (possibly PEFT-wrapped) Qwen2-VL model, by kind, in model order."""
    regions: dict[str, list] = {kind: [] for kind in REGION_LISTS}
    for name, module in model.named_modules():
        for kind, pattern in REGION_LISTS.items():
            if pattern.search(name):
                regions[kind].extend(module)
    return regions


def is_quantized(module) -> bool:
    """Whether a region holds bitsandbytes 4-/8-bit weights (QLoRA's LLM layers)."""
    if any(type(m).__name__ in QUANTIZED_LAYER_NAMES for m in module.modules()):
        return True
    return any(type(p).__name__ in QUANTIZED_LAYER_NAMES for p in module.parameters())


def compile_regions(
    model, dynamic: bool = True, backend: str | None = None, include_quantized: bool = False
) -> int:
    """Compile each decoder layer and vision block of `model` in place; returns how many were compiled.

    `backend` None is inductor (fused kernels: the point of it); tests pass "aot_eager", which
    traces and differentiates the same graphs without generating code. `include_quantized`
    compiles 4-bit decoder layers too (see the module docstring for why that is off).
    """
    configure_dynamo()
    options = {"dynamic": dynamic, **({"backend": backend} if backend else {})}
    compiled: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for kind, layers in find_regions(model).items():
        for layer in layers:
            if is_quantized(layer) and not (include_quantized or is_dequantized(layer)):
                skipped[kind] = skipped.get(kind, 0) + 1
                continue
            layer.compile(**options)
            compiled[kind] = compiled.get(kind, 0) + 1
    total = sum(compiled.values())
    log.info(
        "regional compilation: %d region(s) (%s), dynamic=%s, backend %s",
        total,
        ", ".join(f"{n} {kind}s" for kind, n in compiled.items()) or "none found",
        dynamic,
        backend or "inductor",
    )
    for kind, n in skipped.items():
        log.info(
            "regional compilation: left %d %s(s) eager: bitsandbytes 4-bit weights break the graph", n, kind
        )
    if total == 0:
        log.warning("regional compilation: no decoder layers or vision blocks found; nothing compiled")
    return total


def uncompile_regions(model) -> int:
    """Undo compile_regions in place: each region runs eagerly again (nn.Module.compile keeps the compiled
    callable beside the module's own); returns how many were compiled."""
    undone = 0
    for layers in find_regions(model).values():
        for layer in layers:
            if getattr(layer, "_compiled_call_impl", None) is not None:
                layer._compiled_call_impl = None
                undone += 1
    return undone


def compile_report() -> dict:
    """What Dynamo did so far in this process: frames compiled, recompilations, graph breaks, seconds.

    A recompilation is a compile of a frame that already had compiled code whose guards failed
    (new shape kind, grad mode, ...); with dynamic shapes it should stay a small constant, not grow
    with the number of steps. The bench prints it as "recompiles".
    """
    import torch._dynamo.utils as utils

    counters = utils.counters
    metrics = utils.get_compilation_metrics() if hasattr(utils, "get_compilation_metrics") else []
    recompiles = sum(1 for m in metrics if getattr(m, "recompile_reason", None))
    seconds = sum(getattr(m, "entire_frame_compile_time_s", None) or 0.0 for m in metrics)
    return {
        "frames_compiled": counters["frames"]["ok"],
        "recompiles": recompiles,
        "recompile_reasons": sorted(
            {m.recompile_reason for m in metrics if getattr(m, "recompile_reason", None)}
        ),
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "compile_s": round(seconds, 2),
    }


def reset_compile_state() -> None:
    """Forget compiled code and counters (between benchmark rows, so each row counts its own)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if hasattr(torch._dynamo.utils, "clear_compilation_metrics"):
        torch._dynamo.utils.clear_compilation_metrics()
