"""The worker: train one recipe on one device (or one chain of stages), the launcher's unit of work.

Run directly or through the plan's entry point:

    python scripts/train_recipe.py --recipe r1-llm-only --gpu 0 --dataset DIR
    python -m src.training.worker --recipe r3 --cpu --model-id fixtures/tiny-qwen2-vl \
        --dataset fixtures/data --max-steps 4 --no-wandb

Flags, exit codes and the files written are documented in docs/architecture.md ("The worker
contract"). Everything that can be checked without torch is checked first: bad input exits 2
before a model loads and before anything is written.

Data parallel: `python -m src.training.distributed --nproc-per-node N -- FLAGS` runs this worker as
N ranks (env RANK, WORLD_SIZE). It checks the flags once before starting them, so the ranks do not
(rank 0 may already be writing into --output-dir). Rank 0 alone writes status.json, train.log,
loss_history.jsonl and the outputs, prints progress lines and evaluates; the other ranks train and
log only warnings, to stderr with a "[rank N]" prefix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from src.recipes import (
    ALIASES,
    RECIPES,
    lora_sizes,
    recipes_file_problems,
    resolve_recipe,
    with_lora,
)
from src.training import progress
from src.utils.files import read_json, write_json_atomic
from src.utils.gpu import is_main_process, rank, setup_gpus, world_size
from src.utils.secrets import RedactingFilter, secret_values

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OOM, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
DEFAULT_DATASET = "fixtures/data"
DEFAULT_BATCH_SIZE, DEFAULT_GRAD_ACCUM, DEFAULT_SAVE_STEPS, DEFAULT_EPOCHS = 4, 1, 200, 3
DEFAULT_EVAL_SAMPLES = 0  # the whole test split
ON_OFF_AUTO = {"auto": None, "on": True, "off": False}  # None: the run resolves "auto"
FLAGS_CHECKED_ENV = "RECIPE_RUNNER_FLAGS_CHECKED"  # set by src.training.distributed for its ranks
log = logging.getLogger("recipe-worker")


def build_parser(recipe_required: bool = True, prog: str = "train_recipe.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune Qwen2-VL for detection with one recipe, on one device.",
        epilog="Recipes: "
        + ", ".join(f"{alias}={key}" for alias, key in ALIASES.items())
        + ". Example: python scripts/train_recipe.py --recipe r1 --gpu 0 --dataset data/",
    )
    arg = parser.add_argument
    arg(
        "--recipe",
        required=recipe_required,
        choices=[*RECIPES, *ALIASES],
        metavar="RECIPE",
        help="recipe key or alias: " + ", ".join([*RECIPES, *ALIASES]),
    )
    arg(
        "--recipes-file",
        metavar="FILE",
        help="a TOML file of more recipes (README.md, 'Your own recipes'); --recipe may name them",
    )
    arg(
        "--gpu",
        default=None,
        help="GPU id(s) or UUID(s), e.g. 0 or 0,1 (two shard one model); "
        "default: inherit CUDA_VISIBLE_DEVICES",
    )
    arg("--cpu", action="store_true", help="train on the CPU even if a GPU is visible")
    arg(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for this worker process, each rank's under data parallelism (default: torch's)",
    )
    arg("--model-id", default=DEFAULT_MODEL, help="hub id or local model directory (default: %(default)s)")
    arg(
        "--dataset",
        default=DEFAULT_DATASET,
        help="imagefolder dir with metadata.jsonl, COCO .json, or hub name (default: %(default)s)",
    )
    arg(
        "--skip-bad-records",
        action="store_true",
        help="drop invalid records (counted in the log) instead of failing",
    )
    arg("--output-dir", default=None, help="where to write (default: outputs/<recipe>)")
    arg(
        "--epochs",
        type=float,
        default=DEFAULT_EPOCHS,
        help="training epochs per stage (default: %(default)s)",
    )
    arg(
        "--max-steps",
        type=int,
        default=-1,
        help="stop each stage after N optimizer steps (overrides --epochs)",
    )
    arg(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="per-device micro-batch, per rank under data parallelism (default: %(default)s)",
    )
    arg(
        "--grad-accum",
        type=int,
        default=DEFAULT_GRAD_ACCUM,
        help="gradient accumulation steps (default: %(default)s)",
    )
    arg("--learning-rate", type=float, default=None, help="override the recipe's learning rate")
    arg("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    arg(
        "--checkpoint",
        default=None,
        help="r3: start stage 2 from this stage-1 output; other recipes: start from this model directory",
    )
    arg(
        "--gradient-checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="recompute activations to save memory (auto: on a GPU, only when the memory planner says the "
        "activations would not fit without it; off on the CPU)",
    )
    arg(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile each decoder layer and vision block (auto: on a GPU for stages of 500 "
        "optimizer steps or more, where the saving repays the compile time; never on the CPU). Compiled "
        "runs also give the vision tower one attention call a block (one batched cuDNN call when a "
        "batch's images share one size) and work out the M-RoPE positions on the host",
    )
    arg(
        "--dequantize-once",
        choices=["auto", "on", "off"],
        default="auto",
        help="QLoRA stages (r1, r3's stage 2): dequantize the frozen 4-bit weights once and keep bf16 "
        "copies, not on every forward and backward; the same numbers, faster, 2 bytes a weight more (auto: "
        "on a GPU when the planner says the copies fit; off keeps the stage at its 4-bit memory)",
    )
    arg(
        "--offload-activations",
        action="store_true",
        help="with recompute (implied): the checkpointed blocks' inputs wait in pinned host memory, copied "
        "on a side stream while the GPU computes. For the least GPU memory at a larger micro-batch: 7B r4 "
        "at 8x2 compiled took 17.9 GiB and 1.42 s a step, against 19.7 GiB and 1.32 s not offloaded and "
        "18.1 GiB and 1.78 s at 4x4 (one H200). Not with --gradient-checkpointing off",
    )
    arg(
        "--save-steps",
        type=int,
        default=DEFAULT_SAVE_STEPS,
        help="checkpoint every N optimizer steps, for --resume; 0 keeps only the final output "
        "(default: %(default)s)",
    )
    arg(
        "--logging-steps",
        type=int,
        default=None,
        metavar="N",
        help="read the loss back and log it every N optimizer steps, and at the last step (default: every "
        "step on the CPU, every 10 on a GPU, where each read is a host sync that leaves the GPU idle; every "
        "step still shows its progress)",
    )
    arg(
        "--resume",
        action="store_true",
        help="continue a run in --output-dir: finished stages are kept, the others resume from their "
        "last checkpoint",
    )
    arg("--skip-eval", action="store_true", help="do not evaluate on the test split after training")
    arg(
        "--eval-samples",
        type=int,
        default=DEFAULT_EVAL_SAMPLES,
        help="test images to evaluate after training (default: 0, the whole test split)",
    )
    arg(
        "--baseline-dir",
        default=None,
        help="also evaluate the untrained --model-id (the zero-shot baseline) into this directory",
    )
    arg(
        "--max-pixels",
        type=int,
        default=None,
        help="resize images to at most this many pixels (default: the processor's own, capped at "
        "1,003,520 = 1280 image tokens; the hub's Qwen2-VL allows 16,384 tokens an image)",
    )
    arg("--min-pixels", type=int, default=None, help="resize images to at least this many pixels")
    arg(
        "--image-root",
        default=None,
        help="where the data set's images are, when they are not beside its annotation file, in "
        "images/, or (COCO) in <split>/ beside annotations/",
    )
    arg("--lora-rank", type=int, default=None, help="LoRA rank for every stage (default: the recipe's, 16)")
    arg("--lora-alpha", type=int, default=None, help="LoRA alpha (default: the recipe's, 32)")
    arg("--lora-dropout", type=float, default=None, help="LoRA dropout (default: the recipe's, 0.05)")
    arg("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    return parser


def check_args(args, recipe) -> list[str]:
    """Every problem with the flags that can be found without loading a model."""
    from src.training.checks import model_and_data_problems, output_dir_problems
    from src.training.offload import flag_problems as offload_flag_problems

    problems = _pixel_problems(args) + (_lora_problems(args) or recipe.problems())
    for flag, value, low in (
        ("--epochs", args.epochs, 0),
        ("--batch-size", args.batch_size, 1),
        ("--grad-accum", args.grad_accum, 1),
    ):
        if value < low or (flag == "--epochs" and value == 0 and args.max_steps <= 0):
            problems.append(f"{flag} {value}: must be at least {low or 'above 0'}")
    if args.max_steps == 0 or args.max_steps < -1:
        problems.append(f"--max-steps {args.max_steps}: use a positive number, or -1 for --epochs")
    if args.learning_rate is not None and not 0 < args.learning_rate < 1:
        problems.append(f"--learning-rate {args.learning_rate}: must be in (0, 1)")
    if args.save_steps < 0:
        problems.append(f"--save-steps {args.save_steps}: use 0 (off) or a positive interval")
    if args.logging_steps is not None and args.logging_steps < 1:
        problems.append(f"--logging-steps {args.logging_steps}: must be at least 1")
    problems += offload_flag_problems(args.offload_activations, args.gradient_checkpointing)
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads {args.threads}: must be at least 1")
    if args.eval_samples < 0:
        problems.append(f"--eval-samples {args.eval_samples}: use 0 (all) or more")
    if args.cpu and args.gpu:
        problems.append("--cpu and --gpu conflict: pass one of them")
    problems += _checkpoint_problems(args, recipe)
    problems += output_dir_problems(Path(args.output_dir), args.resume)
    problems += model_and_data_problems(
        args.checkpoint or args.model_id,
        args.dataset,
        args.skip_bad_records,
        image_root=args.image_root,
        evaluate=not args.skip_eval,
    )
    return problems


def _pixel_problems(args) -> list[str]:
    problems = [
        f"{flag} {value}: must be at least 784 (one 28x28 image token)"
        for flag, value in (("--min-pixels", args.min_pixels), ("--max-pixels", args.max_pixels))
        if value is not None and value < 28 * 28
    ]
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        problems.append(f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}")
    return problems


def _lora_problems(args) -> list[str]:
    problems = [
        f"{flag} {value}: must be at least 1"
        for flag, value in (("--lora-rank", args.lora_rank), ("--lora-alpha", args.lora_alpha))
        if value is not None and value < 1
    ]
    if args.lora_dropout is not None and not 0 <= args.lora_dropout < 1:
        problems.append(f"--lora-dropout {args.lora_dropout}: must be in [0, 1)")
    return problems


def _checkpoint_problems(args, recipe) -> list[str]:
    from src.training.run import is_stage_one_output

    if args.checkpoint is None:
        return []
    if not Path(args.checkpoint).is_dir():
        return [f"--checkpoint {args.checkpoint}: not a directory"]
    if recipe.stages and not is_stage_one_output(args.checkpoint):
        return [
            f"--checkpoint {args.checkpoint}: not a stage-1 output of r3 (expected the "
            "'stage1-vision/merged' directory of an earlier r3 run)"
        ]
    return []


def configure_logging(log_file: Path) -> None:
    """Rank 0 (or a lone worker): INFO to stderr and train.log. Other ranks: warnings to stderr only."""
    main_process = is_main_process()
    prefix = "" if main_process else f"[rank {rank()}] "
    fmt = logging.Formatter(prefix + "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if main_process:
        handlers.append(logging.FileHandler(log_file))
    secrets = RedactingFilter(secret_values())
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(secrets)
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING, handlers=handlers, force=True
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None, recipe=None, prog: str = "train_recipe.py") -> int:
    """Train `--recipe`, or the given recipe object (scripts/train.py builds one from flags)."""
    args, recipe = parse_worker_args(argv, recipe, prog)
    # A rank of src.training.distributed: the flags were checked and --gpu applied there, once.
    if os.environ.get(FLAGS_CHECKED_ENV) != "1":
        if problems := check_args(args, recipe):
            print("error: " + "\nerror: ".join(problems), file=sys.stderr)
            return EXIT_USAGE
        setup_gpus(args.gpu)  # before torch loads: CUDA reads it once
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # bars are noise in a piped log
    progress.ENABLED = is_main_process()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    configure_logging(output / "train.log")
    return run_worker(args, recipe, output)


def parse_worker_args(argv: list[str] | None, recipe=None, prog: str = "train_recipe.py"):
    """(args, recipe) from the worker's flags, with --output-dir's default filled in."""
    load_recipes_file(argv)
    args = build_parser(recipe_required=recipe is None, prog=prog).parse_args(argv)
    recipe = recipe or resolve_recipe(args.recipe)
    recipe = with_lora(recipe, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout)
    args.output_dir = args.output_dir or f"outputs/{recipe.name}"
    return args, recipe


def load_recipes_file(argv: list[str] | None) -> None:
    """Add --recipes-file's recipes before the parser lists the ones --recipe may name; exit 2 if bad."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --recipe is not --recipes-file
    early.add_argument("--recipes-file")
    path = early.parse_known_args(argv)[0].recipes_file
    if path is None:
        return
    if problems := recipes_file_problems(path):
        print(f"error: --recipes-file {path}:\n" + "\n".join(problems), file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def initial_status(args, recipe, output: Path, device_info: dict) -> tuple[dict, dict]:
    """status.json at start, and the stages already finished (name -> output) when resuming."""
    status = {
        "recipe": recipe.name,
        "status": "running",
        "exit_code": None,
        "device": device_info,
        "world_size": world_size(),
        "lora": lora_sizes(recipe),
        "started": time.time(),
        "ended": None,
        "final_loss": None,
        "output": None,
        "stages": [],
        "argv": sys.argv,
        "pid": os.getpid(),
        "resumed": 0,
    }
    if not args.resume:
        return status, {}
    earlier = read_json(output / "status.json", {})
    finished = [s for s in earlier.get("stages", []) if s.get("output") and Path(s["output"]).exists()]
    status.update(
        stages=finished,
        resumed=earlier.get("resumed", 0) + 1,
        started=earlier.get("started", status["started"]),
    )
    if finished:
        status.update(final_loss=finished[-1].get("final_loss"), output=finished[-1]["output"])
    done = {s["name"]: s["output"] for s in finished}
    log.info("resuming %s; finished stages kept: %s", recipe.name, ", ".join(done) or "none")
    return status, done


class Interrupted(Exception):
    """SIGTERM from the launcher: stop like Ctrl-C, recording the run as interrupted."""


def _raise_interrupted(signum, frame):
    if world_size() > 1:
        # A rank gets each signal twice (sent to the process group, then forwarded by the elastic
        # agent): ignore the second, so it cannot cut the first one's status update short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Interrupted(f"signal {signum}")


def run_worker(args, recipe, output: Path) -> int:
    """Resolve the device once, train every stage, keep status.json true at each step."""
    import torch
    from transformers.utils import logging as hf_logging

    from src.training.run import run_recipe
    from src.training.tracking import finish_wandb
    from src.utils.gpu import describe_device, resolve_device

    hf_logging.disable_progress_bar()  # weight loading/saving bars: noise in a log file
    signal.signal(signal.SIGTERM, _raise_interrupted)
    if world_size() > 1:
        signal.signal(signal.SIGINT, _raise_interrupted)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.cpu)
    if world_size() > 1:
        from src.training.distributed import join_process_group

        join_process_group(device)
    device_info = describe_device(device)
    main_process = is_main_process()
    status, done_stages = initial_status(args, recipe, output, device_info)

    def write_status() -> None:
        if main_process:  # one status.json per run, whatever the number of ranks
            write_json_atomic(output / "status.json", status)

    write_status()
    progress.emit(
        "start",
        recipe=recipe.name,
        stage=(recipe.stages or (recipe,))[0].name,
        device=device,
        device_name=device_info["name"],
        device_uuid=device_info["uuid"],
        pid=os.getpid(),
        world_size=world_size(),
    )
    log.info(
        "recipe %s on %s (%s %s), %d data-parallel process(es)",
        recipe.name,
        device,
        device_info["name"],
        device_info["uuid"] or "",
        world_size(),
    )
    wandb_on = main_process and not args.no_wandb and _start_tracking(recipe, args, output)
    opts = run_options(args, device, output, wandb_on)

    def stage_done(result) -> None:
        status["stages"].append(stage_record(result))
        peaks = [s["peak_gpu_mem_gib"] for s in status["stages"] if s.get("peak_gpu_mem_gib") is not None]
        status.update(
            final_loss=result.final_loss,
            output=str(result.output),
            peak_gpu_mem_gib=max(peaks) if peaks else None,
        )
        write_status()

    code, error = EXIT_OK, None
    try:
        run_recipe(recipe, opts, on_stage_done=stage_done, done_stages=done_stages)
    except (KeyboardInterrupt, Interrupted) as stop:
        code, error = EXIT_INTERRUPTED, f"interrupted ({type(stop).__name__})"
        log.error("interrupted; rerun with --resume to continue from the last checkpoint")
    except Exception as failure:  # a failed run is reported, never silent
        code, error = exit_code_for(failure), f"{type(failure).__name__}: {failure}"
        log.error("training failed:\n%s", traceback.format_exc())
        if code == EXIT_OOM:
            log.error("out of GPU memory: try a smaller --batch-size with a larger --grad-accum")
    finally:
        if wandb_on:
            finish_wandb()
    status.update(
        status={EXIT_OK: "succeeded", EXIT_INTERRUPTED: "interrupted"}.get(code, "failed"),
        exit_code=code,
        ended=time.time(),
        error=error,
    )
    write_status()
    if not main_process:  # training is over for this rank; rank 0 evaluates alone, no collectives
        return code
    if code == EXIT_OK:  # evaluation reads the finished run's status.json to find its model
        status["eval"] = evaluate_after_training(args, output, device)
        write_status()
    if code == EXIT_OK and args.baseline_dir and not args.skip_eval:
        status["baseline"] = evaluate_baseline(args, device)
        write_status()
    progress.emit(
        "end",
        recipe=recipe.name,
        status=status["status"],
        final_loss=status["final_loss"],
        exit_code=code,
        error=error,
    )
    return code


def evaluate_after_training(args, output: Path, device: str) -> dict:
    """Detection metrics of the trained model on the test split, written beside its outputs.

    A failed evaluation is recorded (and logged with its traceback) but does not undo a finished
    training run: the adapter is there, and `recipe-run eval` can try again.
    """
    if args.skip_eval:
        return {"status": "skipped"}
    from src.eval.evaluate import METRICS_FILE, evaluate_output

    progress.emit("stage_start", recipe=args.recipe, stage="eval", model=str(output))
    try:
        metrics = evaluate_output(
            output,
            args.dataset,
            max_samples=args.eval_samples or None,
            device=device,
            image_root=args.image_root,
        )
    except Exception as failure:  # reported in status.json and the log, never silent
        log.error("evaluation failed:\n%s", traceback.format_exc())
        return {"status": "failed", "error": f"{type(failure).__name__}: {failure}"}
    headline = {k: metrics.get(k) for k in ("precision", "recall", "f1", "map_50", "parse_rate")}
    log.info("evaluation on the test split: %s", json.dumps(headline))
    return {"status": "succeeded", "metrics": str(output / METRICS_FILE), **headline}


def evaluate_baseline(args, device: str) -> dict:
    """The untrained model on the same test images: the zero-shot numbers every recipe is judged by."""
    from src.eval.evaluate import evaluate_base

    progress.emit("stage_start", recipe=args.recipe, stage="baseline", model=args.model_id)
    try:
        metrics = evaluate_base(
            args.model_id,
            args.dataset,
            args.baseline_dir,
            max_samples=args.eval_samples or None,
            device=device,
            image_root=args.image_root,
            pixels=(args.min_pixels, args.max_pixels),  # the resolution the recipes trained at
        )
    except Exception as failure:  # the recipe's own results stand; the report shows no baseline
        log.error("baseline evaluation failed:\n%s", traceback.format_exc())
        return {"status": "failed", "error": f"{type(failure).__name__}: {failure}"}
    log.info("zero-shot baseline: precision %.3f, f1 %.3f", metrics["precision"], metrics["f1"])
    return {"status": "succeeded", "dir": args.baseline_dir}


def exit_code_for(failure: BaseException) -> int:
    """EXIT_OOM for CUDA out-of-memory (typed, or a cuBLAS/cuDNN allocation failure), else EXIT_FAILED."""
    import torch

    text = str(failure)
    if isinstance(failure, torch.cuda.OutOfMemoryError) or (
        isinstance(failure, RuntimeError) and ("CUDA out of memory" in text or "ALLOC_FAILED" in text)
    ):
        return EXIT_OOM
    return EXIT_FAILED


def run_options(args, device: str, output: Path, wandb_on: bool):
    from src.training.run import RunOptions

    return RunOptions(
        model_id=args.model_id,
        dataset=args.dataset,
        output_dir=output,
        device=device,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=args.learning_rate,
        seed=args.seed,
        wandb=wandb_on,
        checkpoint=args.checkpoint,
        skip_bad_records=args.skip_bad_records,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        resume=args.resume,
        gradient_checkpointing=ON_OFF_AUTO[args.gradient_checkpointing],
        compile=ON_OFF_AUTO[args.compile],
        dequantize_once=ON_OFF_AUTO[args.dequantize_once],
        offload_activations=args.offload_activations,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        image_root=args.image_root,
    )


def stage_record(result) -> dict:
    """One finished stage as status.json lists it."""
    return {
        "name": result.name,
        "status": "succeeded",
        "output": str(result.output),
        "final_loss": result.final_loss,
        "steps": result.steps,
        "trainable": result.trainable,
        "skipped_records": result.skipped_records,
        "peak_gpu_mem_gib": result.peak_gpu_mem_gib,
        "train_seconds": result.train_seconds,
        "samples_per_step": result.samples_per_step,
    }


def _start_tracking(recipe, args, output: Path) -> bool:
    from src.training.tracking import start_wandb

    return start_wandb(
        recipe.name,
        str(output),
        {"recipe": recipe.name, **{k: v for k, v in vars(args).items() if k not in ("no_wandb",)}},
    )


if __name__ == "__main__":
    raise SystemExit(main())
