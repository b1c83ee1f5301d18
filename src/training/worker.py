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

from src.contract import exits, progress
from src.contract.env import FLAGS_CHECKED_ENV
from src.contract.flags import add_worker_flags, run_option_values, value_problems
from src.recipes import (
    ALIASES,
    RECIPES,
    lora_sizes,
    recipes_file_problems,
    resolve_recipe,
    with_lora,
)
from src.utils.files import read_json, write_json_atomic
from src.utils.gpu import is_main_process, rank, setup_gpus, world_size
from src.utils.secrets import RedactingFilter, secret_values

log = logging.getLogger("recipe-worker")


def build_parser(recipe_required: bool = True, prog: str = "train_recipe.py") -> argparse.ArgumentParser:
    """--recipe, and every flag of the one table (src/contract/flags.py)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune Qwen2-VL for detection with one recipe, on one device.",
        epilog="Recipes: "
        + ", ".join(f"{alias}={key}" for alias, key in ALIASES.items())
        + ". Example: python scripts/train_recipe.py --recipe r1 --gpu 0 --dataset data/",
    )
    parser.add_argument(
        "--recipe",
        required=recipe_required,
        choices=[*RECIPES, *ALIASES],
        metavar="RECIPE",
        help="recipe key or alias: " + ", ".join([*RECIPES, *ALIASES]),
    )
    add_worker_flags(parser)
    return parser


def check_args(args, recipe) -> list[str]:
    """Every problem with the flags that can be found without loading a model."""
    from src.data.checks import model_and_data_problems, output_dir_problems

    problems = value_problems(vars(args)) + recipe.problems()
    problems += _checkpoint_problems(args, recipe)
    problems += output_dir_problems(Path(args.output_dir), args.resume)
    problems += model_and_data_problems(
        args.checkpoint or args.model_id,
        args.dataset,
        args.skip_bad_records,
        image_root=args.image_root,
        evaluate=not args.skip_eval,
        val_fraction=args.val_fraction,
    )
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
            return exits.USAGE
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
        raise SystemExit(exits.USAGE)


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
    finished = [
        s
        for s in earlier.get("stages", [])
        if s.get("status", "succeeded") == "succeeded" and s.get("output") and Path(s["output"]).exists()
    ]
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
    from src.utils.gpu import cap_gpu_memory, describe_device, resolve_device

    hf_logging.disable_progress_bar()  # weight loading/saving bars: noise in a log file
    signal.signal(signal.SIGTERM, _raise_interrupted)
    if world_size() > 1:
        signal.signal(signal.SIGINT, _raise_interrupted)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.cpu)
    cap = cap_gpu_memory(device)  # a packed job: held to its reservation before anything is allocated
    if world_size() > 1:
        from src.training.config import join_process_group

        join_process_group(device)
    device_info = describe_device(device)
    main_process = is_main_process()
    status, done_stages = initial_status(args, recipe, output, device_info)
    status["reservation_gib"] = round(cap[0] / 1024, 2) if cap else None

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
    if cap:
        log.info(
            "GPU memory capped at this job's reservation: %.2f GiB (%.1f%% of the GPU), as it may share it",
            cap[0] / 1024,
            cap[1] * 100,
        )
    wandb_on = main_process and not args.no_wandb and _start_tracking(recipe, args, output)
    opts = run_options(args, device, output, wandb_on)
    kept: dict = {}  # the last stage's trained model, where the worker scores it in memory

    def stage_done(result) -> None:
        if result.trained is not None:
            kept["trained"] = result.trained
        record = stage_record(result)
        if result.paused:  # not finished: a later --resume trains it on; evaluation reads its adapter
            status["paused"] = {**record, "status": "paused", "at": opts.pause_at}
        else:
            status["stages"].append(record)
        status.update(
            final_loss=result.final_loss,
            output=str(result.output),
            peak_gpu_mem_gib=_peak([*status["stages"], record], "peak_gpu_mem_gib"),
            peak_gpu_reserved_gib=_peak([*status["stages"], record], "peak_gpu_reserved_gib"),
            val_loss=result.val_loss,
        )
        write_status()

    code, error = exits.OK, None
    try:
        run_recipe(recipe, opts, on_stage_done=stage_done, done_stages=done_stages)
    except (KeyboardInterrupt, Interrupted) as stop:
        code, error = exits.INTERRUPTED, f"interrupted ({type(stop).__name__})"
        log.error("interrupted; rerun with --resume to continue from the last checkpoint")
    except Exception as failure:  # a failed run is reported, never silent
        code, error = exit_code_for(failure), f"{type(failure).__name__}: {failure}"
        log.error("training failed:\n%s", traceback.format_exc())
        if code == exits.OOM and cap:
            log.error(
                "out of GPU memory under this job's reservation cap (%.2f GiB): its own OOM, not a "
                "neighbour's; the launcher runs it again alone on a GPU, uncapped",
                cap[0] / 1024,
            )
        elif code == exits.OOM:
            log.error("out of GPU memory: try a smaller --batch-size with a larger --grad-accum")
    finally:
        if wandb_on:
            finish_wandb()
    status.update(
        status={exits.OK: "succeeded", exits.INTERRUPTED: "interrupted"}.get(code, "failed"),
        exit_code=code,
        ended=time.time(),
        error=error,
    )
    write_status()
    if not main_process:  # training is over for this rank; rank 0 evaluates alone, no collectives
        return code
    if code == exits.OK:  # evaluation reads the finished run's status.json to find its model
        status["eval"] = evaluate_after_training(args, output, device, kept.pop("trained", None))
        write_status()
    kept.clear()
    if code == exits.OK and args.baseline_dir and not args.skip_eval:
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


def evaluate_after_training(args, output: Path, device: str, trained: tuple | None = None) -> dict:
    """Detection metrics of the trained model on --eval-split (the test split, or a search trial's validation
    split), written beside its outputs.

    `trained` (model, processor, family): the model still in memory (a search trial, run_options), scored
    as it is instead of loaded again from the saved adapter; the same answers, one model load fewer.
    A failed evaluation is recorded (and logged with its traceback) but does not undo a finished
    training run: the adapter is there, and `recipe-run eval` can try again.
    """
    if args.skip_eval:
        return {"status": "skipped"}
    from src.eval.evaluate import METRICS_FILE, evaluate_output

    progress.emit("stage_start", recipe=args.recipe, stage="eval", model=str(output))
    try:
        if trained is not None:
            from src.training.run import ready_for_generation

            model, processor, family = trained
            trained = (ready_for_generation(model), processor, family)
            log.info("scoring the trained model in memory (not loaded again)")
        metrics = evaluate_output(
            output,
            args.dataset,
            split=args.eval_split,
            max_samples=args.eval_samples or None,
            device=device,
            image_root=args.image_root,
            val_fraction=args.val_fraction,
            loaded=trained,
        )
    except Exception as failure:  # reported in status.json and the log, never silent
        log.error("evaluation failed:\n%s", traceback.format_exc())
        return {"status": "failed", "error": f"{type(failure).__name__}: {failure}"}
    headline = {k: metrics.get(k) for k in ("precision", "recall", "f1", "map_50", "parse_rate")}
    log.info("evaluation on the %s split: %s", args.eval_split, json.dumps(headline))
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
    """exits.OOM for CUDA out-of-memory (typed, or a cuBLAS/cuDNN allocation failure), else exits.FAILED."""
    import torch

    text = str(failure)
    if isinstance(failure, torch.cuda.OutOfMemoryError) or (
        isinstance(failure, RuntimeError) and ("CUDA out of memory" in text or "ALLOC_FAILED" in text)
    ):
        return exits.OOM
    return exits.FAILED


def run_options(args, device: str, output: Path, wandb_on: bool):
    """RunOptions from the flags, by the table: every flag marked run_option fills its field."""
    from src.training.options import RunOptions

    return RunOptions(
        **run_option_values(args),
        output_dir=output,
        device=device,
        wandb=wandb_on,
        validation_loss=args.eval_split == "validation",  # the search breaks ties by it
        # a search trial is scored in memory: its validation scoring then loads no model (one rank only:
        # rank 0 scores alone after training, and the others' copies are not kept)
        keep_trained=args.eval_split == "validation" and not args.skip_eval and world_size() == 1,
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
        "peak_gpu_reserved_gib": result.peak_gpu_reserved_gib,
        "train_seconds": result.train_seconds,
        "samples_per_step": result.samples_per_step,
        "val_loss": result.val_loss,
    }


def _peak(stages: list[dict], key: str) -> float | None:
    """The largest of the stages' measured peaks (GiB), None where none was measured (the CPU)."""
    peaks = [stage[key] for stage in stages if stage.get(key)]
    return max(peaks) if peaks else None


def _start_tracking(recipe, args, output: Path) -> bool:
    from src.training.tracking import start_wandb

    return start_wandb(
        recipe.name,
        str(output),
        {"recipe": recipe.name, **{k: v for k, v in vars(args).items() if k not in ("no_wandb",)}},
    )


if __name__ == "__main__":
    raise SystemExit(main())
