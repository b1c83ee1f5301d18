"""The worker: train one recipe on one device (or one chain of stages), the launcher's unit of work.

Run directly or through the plan's entry point:

    python scripts/train_recipe.py --recipe r1-llm-only --gpu 0 --dataset DIR
    python -m src.training.worker --recipe r3 --cpu --model-id fixtures/tiny-qwen2-vl \
        --dataset fixtures/data --max-steps 4 --no-wandb

Flags, exit codes and the files written are documented in docs/architecture.md ("The worker
contract"). Everything that can be checked without torch is checked first: bad input exits 2
before a model loads and before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from src.recipes import ALIASES, RECIPES, resolve_recipe
from src.training import progress
from src.utils.files import write_json_atomic
from src.utils.gpu import setup_gpus

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OOM = 0, 1, 2, 3
DEFAULT_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
DEFAULT_DATASET = "fixtures/data"
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
        "--gpu",
        default=None,
        help="GPU id(s) or UUID(s), e.g. 0 or 0,1 (two shard one model); "
        "default: inherit CUDA_VISIBLE_DEVICES",
    )
    arg("--cpu", action="store_true", help="train on the CPU even if a GPU is visible")
    arg("--threads", type=int, default=None, help="CPU threads for this worker (default: torch's choice)")
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
    arg("--epochs", type=float, default=3, help="training epochs per stage (default: %(default)s)")
    arg(
        "--max-steps",
        type=int,
        default=-1,
        help="stop each stage after N optimizer steps (overrides --epochs)",
    )
    arg("--batch-size", type=int, default=4, help="per-device micro-batch (default: %(default)s)")
    arg("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: %(default)s)")
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
        help="recompute activations to save memory (auto: on for GPUs, off on the CPU)",
    )
    arg("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    return parser


def check_args(args, recipe) -> list[str]:
    """Every problem with the flags that can be found without loading a model."""
    from src.data.dataset import DatasetError, load_records
    from src.models.loader import local_model_problem

    problems = recipe.problems()
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
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads {args.threads}: must be at least 1")
    if args.cpu and args.gpu:
        problems.append("--cpu and --gpu conflict: pass one of them")
    problems.extend(_checkpoint_problems(args, recipe))
    if problem := local_model_problem(args.checkpoint or args.model_id):
        problems.append(problem)
    output = Path(args.output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        problems.append(f"--output-dir {output}: exists and is not empty; choose a new directory")
    elif not os.access(_existing_parent(output), os.W_OK):
        problems.append(f"--output-dir {output}: not writable; choose a directory you can write to")
    try:
        load_records(args.dataset, "train", args.skip_bad_records)
    except DatasetError as error:
        problems.append(str(error))
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


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def configure_logging(log_file: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(log_file)]
    for handler in handlers:
        handler.setFormatter(fmt)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None, recipe=None, prog: str = "train_recipe.py") -> int:
    """Train `--recipe`, or the given recipe object (scripts/train.py builds one from flags)."""
    args = build_parser(recipe_required=recipe is None, prog=prog).parse_args(argv)
    recipe = recipe or resolve_recipe(args.recipe)
    args.output_dir = args.output_dir or f"outputs/{recipe.name}"
    if problems := check_args(args, recipe):
        print("error: " + "\nerror: ".join(problems), file=sys.stderr)
        return EXIT_USAGE
    setup_gpus(args.gpu)  # before torch loads: CUDA reads it once
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    configure_logging(output / "train.log")
    return run_worker(args, recipe, output)


def run_worker(args, recipe, output: Path) -> int:
    """Resolve the device once, train every stage, keep status.json true at each step."""
    import torch

    from src.training.run import RunOptions, run_recipe
    from src.training.tracking import finish_wandb
    from src.utils.gpu import describe_device, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.cpu)
    device_info = describe_device(device)
    status = {
        "recipe": recipe.name,
        "status": "running",
        "exit_code": None,
        "device": device_info,
        "started": time.time(),
        "ended": None,
        "final_loss": None,
        "output": None,
        "stages": [],
        "argv": sys.argv,
        "pid": os.getpid(),
    }
    write_json_atomic(output / "status.json", status)
    progress.emit(
        "start",
        recipe=recipe.name,
        stage=(recipe.stages or (recipe,))[0].name,
        device=device,
        device_name=device_info["name"],
        device_uuid=device_info["uuid"],
        pid=os.getpid(),
    )
    log.info("recipe %s on %s (%s %s)", recipe.name, device, device_info["name"], device_info["uuid"] or "")
    wandb_on = not args.no_wandb and _start_tracking(recipe, args, output)
    opts = RunOptions(
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
        gradient_checkpointing={"auto": None, "on": True, "off": False}[args.gradient_checkpointing],
    )

    def stage_done(result) -> None:
        status["stages"].append(
            {
                "name": result.name,
                "status": "succeeded",
                "output": str(result.output),
                "final_loss": result.final_loss,
                "steps": result.steps,
                "trainable": result.trainable,
                "skipped_records": result.skipped_records,
                "peak_gpu_mem_gib": result.peak_gpu_mem_gib,
                "train_seconds": result.train_seconds,
            }
        )
        peaks = [s["peak_gpu_mem_gib"] for s in status["stages"] if s["peak_gpu_mem_gib"] is not None]
        status.update(
            final_loss=result.final_loss,
            output=str(result.output),
            peak_gpu_mem_gib=max(peaks) if peaks else None,
        )
        write_json_atomic(output / "status.json", status)

    code, error = EXIT_OK, None
    try:
        run_recipe(recipe, opts, on_stage_done=stage_done)
    except torch.cuda.OutOfMemoryError as oom:
        code, error = EXIT_OOM, f"CUDA out of memory: {oom}"
        log.error("%s\nTry a smaller --batch-size with a larger --grad-accum.", error)
    except Exception as failure:  # a failed run is reported, never silent
        code, error = EXIT_FAILED, f"{type(failure).__name__}: {failure}"
        log.error("training failed:\n%s", traceback.format_exc())
    finally:
        if wandb_on:
            finish_wandb()
    status.update(
        status="succeeded" if code == EXIT_OK else "failed", exit_code=code, ended=time.time(), error=error
    )
    write_json_atomic(output / "status.json", status)
    progress.emit(
        "end",
        recipe=recipe.name,
        status=status["status"],
        final_loss=status["final_loss"],
        exit_code=code,
        error=error,
    )
    return code


def _start_tracking(recipe, args, output: Path) -> bool:
    from src.training.tracking import start_wandb

    return start_wandb(
        recipe.name,
        str(output),
        {"recipe": recipe.name, **{k: v for k, v in vars(args).items() if k not in ("no_wandb",)}},
    )


if __name__ == "__main__":
    raise SystemExit(main())
