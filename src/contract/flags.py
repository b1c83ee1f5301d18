"""The worker's flags, defined once: the worker's parser, the launcher's pass-through flags, `TrainFlags`
(what a launch passes to every worker) and the worker's `RunOptions` are all derived from `FLAGS`.

Adding a training flag is one `Flag` here plus the code that uses it: with `run_option=True` the worker
copies its value into the `RunOptions` field of the same name (a test holds every such field to exist),
with `passed=True` `recipe-run` offers it too and passes it to every worker it starts.

Torch-free: the launcher imports it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
DEFAULT_DATASET = "fixtures/data"
ON_OFF_AUTO = ("auto", "on", "off")
AUTO_EFFECTIVE_BATCH = 16  # samples per optimizer step that recipe-run's --batch-size auto keeps
_SWITCH = {"auto": None, "on": True, "off": False}  # the run resolves None ("auto") itself


def int_or_auto(text: str) -> int | str:
    """argparse type for flags like --batch-size that take a whole number or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or auto") from None


@dataclass(frozen=True)
class Flag:
    """One worker flag: how it parses, its default, its help, the values it takes, and who else uses it."""

    name: str  # as typed: "--max-pixels"; its value lands in args.max_pixels (`dest`)
    help: str
    type: Callable[[str], Any] | None = str  # None: a switch (store_true)
    default: Any = None  # the worker's default
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    passed: bool = False  # recipe-run offers it and passes it to every worker (a training flag)
    run_option: bool = False  # the worker copies it into RunOptions.<dest> (on/off/auto as True/False/None)
    valid: Callable[[Any], bool] | None = None  # a value it must hold, said by `want`
    want: str = ""
    launcher_type: Callable[[str], Any] | None = None  # recipe-run's parse, where it takes more (auto)
    launcher_help: str | None = None  # recipe-run's text, where it means more than the worker's

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    @property
    def switch(self) -> bool:
        return self.type is None

    def add_to(self, parser: argparse.ArgumentParser | Any, launcher: bool = False) -> None:
        """The flag on a parser: the worker's (with its default), or recipe-run's (default None: unset,
        the worker's default applies)."""
        text = (self.launcher_help or self.help) if launcher else self.help
        if self.switch:
            parser.add_argument(self.name, action="store_true", help=text)
            return
        default = None if launcher else self.default
        if not launcher and default not in (None, 0) and self.choices is None:
            text += " (default: %(default)s)"
        parse = (self.launcher_type or self.type) if launcher else self.type
        assert parse is not None  # a switch returned above
        parser.add_argument(
            self.name,
            type=parse,
            default=default,
            choices=self.choices,
            metavar=self.metavar,
            help=text,
        )

    def option_value(self, value: Any) -> Any:
        """The value as RunOptions holds it: on/off/auto become True/False/None."""
        return _SWITCH[value] if self.choices == ON_OFF_AUTO else value


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda value: value >= low


def _pixels(value: int) -> bool:
    return value >= 28 * 28


FLAGS: tuple[Flag, ...] = (
    Flag(
        "--model-id",
        "hub id or local model directory",
        default=DEFAULT_MODEL,
        metavar="ID",
        passed=True,
        run_option=True,
    ),
    Flag(
        "--dataset",
        "imagefolder dir with metadata.jsonl, COCO .json, YOLO or VOC folder, or hub name",
        default=DEFAULT_DATASET,
        metavar="PATH",
        passed=True,
        run_option=True,
    ),
    Flag(
        "--skip-bad-records",
        "drop invalid records (counted in the log) instead of failing",
        type=None,
        passed=True,
        run_option=True,
    ),
    Flag(
        "--epochs",
        "training epochs per stage",
        type=float,
        default=3.0,
        metavar="N",
        passed=True,
        run_option=True,
        valid=_at_least(0),
        want="0 or more (0 only with --max-steps)",
    ),
    Flag(
        "--max-steps",
        "stop each stage after N optimizer steps (overrides --epochs)",
        type=int,
        default=-1,
        metavar="N",
        passed=True,
        run_option=True,
        valid=lambda v: v >= 1 or v == -1,
        want="at least 1, or -1 for --epochs",
    ),
    Flag(
        "--batch-size",
        "per-device micro-batch, per rank under data parallelism",
        type=int,
        default=4,
        metavar="N",
        passed=True,
        run_option=True,
        valid=lambda v: v == "auto" or v >= 1,
        want="at least 1",
        launcher_type=int_or_auto,
        launcher_help="per-device micro-batch; auto: the fastest setting the memory planner fits on the "
        f"GPU, with accumulation keeping {AUTO_EFFECTIVE_BATCH} samples a step",
    ),
    Flag(
        "--grad-accum",
        "gradient accumulation steps",
        type=int,
        default=1,
        metavar="N",
        passed=True,
        run_option=True,
        valid=_at_least(1),
        want="at least 1",
    ),
    Flag(
        "--learning-rate",
        "learning rate (default: each recipe's own)",
        type=float,
        metavar="LR",
        passed=True,
        run_option=True,
        valid=lambda v: 0 < v < 1,
        want="between 0 and 1",
    ),
    Flag(
        "--seed",
        "random seed",
        type=int,
        default=42,
        metavar="N",
        passed=True,
        run_option=True,
        valid=_at_least(0),
        want="0 or more",
    ),
    Flag(
        "--gradient-checkpointing",
        "recompute activations to save memory (auto: on a GPU, only when the "
        "memory planner says the activations would not fit without it; off on the CPU)",
        default="auto",
        choices=ON_OFF_AUTO,
        passed=True,
        run_option=True,
    ),
    Flag(
        "--compile",
        "torch.compile each decoder layer and vision block (auto: on a GPU for stages of 500 "
        "optimizer steps or more, where the saving repays the compile time; never on the CPU). Compiled "
        "runs also give the vision tower one attention call a block (one batched cuDNN call when a "
        "batch's images share one size) and work out the M-RoPE positions on the host",
        default="auto",
        choices=ON_OFF_AUTO,
        passed=True,
        run_option=True,
    ),
    Flag(
        "--dequantize-once",
        "QLoRA stages (r1, r3's stage 2): dequantize the frozen 4-bit weights once and "
        "keep bf16 copies, not on every forward and backward; the same numbers, faster, 2 bytes a weight "
        "more (auto: on a GPU when the planner says the copies fit; off keeps the stage at its 4-bit "
        "memory)",
        default="auto",
        choices=ON_OFF_AUTO,
        passed=True,
        run_option=True,
    ),
    Flag(
        "--group-by-size",
        "draw each micro-batch from images of one size (one number of vision patches) where the data "
        "set mixes sizes, so the vision tower attends in one batched call: the shuffled order is sorted by "
        "size within windows of up to 50 optimizer steps, as transformers' group_by_length does for text; "
        "every image once an epoch, the same samples a step (auto: on a GPU when the training images are "
        "of more than one size; a data set of one size keeps the plain shuffled order either way)",
        default="auto",
        choices=ON_OFF_AUTO,
        passed=True,
        run_option=True,
    ),
    Flag(
        "--offload-activations",
        "with recompute (implied): the checkpointed blocks' inputs wait in pinned host "
        "memory, copied on a side stream while the GPU computes. For the least GPU memory at a larger "
        "micro-batch: 7B r4 at 8x2 compiled took 17.9 GiB and 1.42 s a step, against 19.7 GiB and 1.32 s "
        "not offloaded and 18.1 GiB and 1.78 s at 4x4 (one H200). Not with --gradient-checkpointing off",
        type=None,
        passed=True,
        run_option=True,
    ),
    Flag(
        "--save-steps",
        "checkpoint every N optimizer steps, for --resume (recipe-run resume); 0 keeps only the final output",
        type=int,
        default=200,
        metavar="N",
        passed=True,
        run_option=True,
        valid=_at_least(0),
        want="0 (off) or more",
    ),
    Flag(
        "--logging-steps",
        "read the loss back and log it every N optimizer steps, and at the last step "
        "(default: every step on the CPU, every 10 on a GPU, where each read is a host sync that leaves "
        "the GPU idle; every step still shows its progress)",
        type=int,
        metavar="N",
        passed=True,
        run_option=True,
        valid=_at_least(1),
        want="at least 1",
    ),
    Flag(
        "--val-fraction",
        "share of the train split held out as the validation split where the data set has no validation "
        "split of its own beside its test split (0: no validation split, training takes the whole train "
        "split); the learning-rate search's trials train without it and are scored on it",
        type=float,
        default=0.0,
        metavar="F",
        run_option=True,
        passed=True,
        valid=lambda v: 0 <= v <= 0.5,
        want="between 0 and 0.5",
        launcher_help="with --lr-search: the share of the train split held out as the validation split the "
        "rates are chosen on, where the data set has none of its own beside its test split (default 0.1)",
    ),
    Flag(
        "--eval-split",
        "the split the evaluation after training scores: test (the report's), or validation (the "
        "learning-rate search's trials)",
        default="test",
        choices=("test", "validation"),
    ),
    Flag(
        "--pause-at",
        "stop after N optimizer steps, counted over every stage of a chain, with a checkpoint; the "
        "learning-rate schedule stays that of --max-steps, so --resume goes on as one run would (the "
        "learning-rate search's rungs). Needs --max-steps",
        type=int,
        metavar="N",
        run_option=True,
        valid=_at_least(1),
        want="at least 1",
    ),
    Flag(
        "--lr-scale",
        "multiply every stage's own learning rate by F (the learning-rate search's trials: a chain's stages "
        "keep their ratio); --learning-rate sets one rate instead",
        type=float,
        default=1.0,
        metavar="F",
        run_option=True,
        valid=lambda v: v > 0,
        want="above 0",
    ),
    Flag(
        "--skip-eval",
        "do not evaluate on the test split after training (nor the zero-shot baseline)",
        type=None,
        passed=True,
    ),
    Flag(
        "--eval-samples",
        "test images to evaluate after training; 0, the default: the whole test split",
        type=int,
        default=0,
        metavar="N",
        passed=True,
        valid=_at_least(0),
        want="0 (all) or more",
    ),
    Flag(
        "--max-pixels",
        "resize images to at most N pixels (default: the processor's own, capped at "
        "1,003,520 = 1280 image tokens; the hub's Qwen2-VL allows 16,384 tokens an image)",
        type=int,
        metavar="N",
        passed=True,
        run_option=True,
        valid=_pixels,
        want="at least 784 (one 28x28 image token)",
    ),
    Flag(
        "--min-pixels",
        "resize images to at least N pixels",
        type=int,
        metavar="N",
        passed=True,
        run_option=True,
        valid=_pixels,
        want="at least 784 (one 28x28 image token)",
    ),
    Flag(
        "--image-root",
        "where the data set's images are, when not beside its annotation file, in images/ "
        "or (COCO) in <split>/ beside annotations/",
        metavar="DIR",
        passed=True,
        run_option=True,
    ),
    Flag(
        "--no-wandb",
        "do not log to Weights & Biases (without a key or network it logs offline, never failing)",
        type=None,
        passed=True,
    ),
    Flag(
        "--recipes-file",
        "a TOML file of more recipes (README.md, 'Your own recipes'); --recipe may name them",
        metavar="FILE",
        passed=True,
    ),
    Flag(
        "--lora-rank",
        "LoRA rank of every stage (default: the recipe's, 16)",
        type=int,
        metavar="R",
        launcher_help="LoRA rank for every recipe (--lora r4:rank=64 for one)",
        valid=_at_least(1),
        want="at least 1",
    ),
    Flag(
        "--lora-alpha",
        "LoRA alpha (default: the recipe's, 32)",
        type=int,
        metavar="A",
        valid=_at_least(1),
        want="at least 1",
    ),
    Flag(
        "--lora-dropout",
        "LoRA dropout (default: the recipe's, 0.05)",
        type=float,
        metavar="P",
        valid=lambda v: 0 <= v < 1,
        want="in [0, 1)",
    ),
    # What the launcher sets per job, and what a user sets running one worker by hand.
    Flag(
        "--gpu",
        "GPU id(s) or UUID(s), e.g. 0 or 0,1 (two shard one model); default: inherit CUDA_VISIBLE_DEVICES",
        metavar="IDS",
    ),
    Flag("--cpu", "train on the CPU even if a GPU is visible", type=None),
    Flag(
        "--threads",
        "CPU threads for this worker process, each rank's under data parallelism (default: torch's)",
        type=int,
        metavar="N",
        valid=_at_least(1),
        want="at least 1",
    ),
    Flag("--output-dir", "where to write (default: outputs/<recipe>)", metavar="DIR"),
    Flag(
        "--checkpoint",
        "r3: start stage 2 from this stage-1 output; other recipes: start from this model directory",
        metavar="DIR",
        run_option=True,
    ),
    Flag(
        "--resume",
        "continue a run in --output-dir: finished stages are kept, the others resume from their "
        "last checkpoint",
        type=None,
        run_option=True,
    ),
    Flag(
        "--baseline-dir",
        "also evaluate the untrained --model-id (the zero-shot baseline) into this directory",
        metavar="DIR",
    ),
)
BY_DEST: dict[str, Flag] = {flag.dest: flag for flag in FLAGS}
PASSED: tuple[Flag, ...] = tuple(flag for flag in FLAGS if flag.passed)
LORA_KEYS = ("rank", "alpha", "dropout")  # --lora-<key>; `recipe-run --lora r4:rank=64` sets them per recipe


def flag_name(dest: str) -> str:
    """ "--batch-size" for "batch_size": a flag named by its one definition."""
    return BY_DEST[dest].name


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    for flag in FLAGS:
        flag.add_to(parser)


def add_training_flags(group: Any) -> None:
    """recipe-run's pass-through flags, and the LoRA sizes it passes per recipe (recipes_file is
    recipe-run's own flag, shared with `list`)."""
    for flag in (*PASSED, *(BY_DEST[f"lora_{key}"] for key in LORA_KEYS)):
        if flag.dest != "recipes_file":
            flag.add_to(group, launcher=True)


def value_problems(values: Mapping[str, Any]) -> list[str]:
    """Every flag whose value is out of range, named with what it must be; unset (None) values pass."""
    problems = []
    for dest, value in values.items():
        flag = BY_DEST.get(dest)
        if flag is None or flag.valid is None or value is None or value is False:
            continue
        if not flag.valid(value):
            problems.append(f"{flag.name} {value}: must be {flag.want}")
    return problems + combination_problems(values)


def combination_problems(values: Mapping[str, Any]) -> list[str]:
    """Flags that are fine alone and wrong together."""
    problems = []
    low, high = values.get("min_pixels"), values.get("max_pixels")
    if low and high and low > high:
        problems.append(f"--min-pixels {low} is above --max-pixels {high}")
    if values.get("offload_activations") and values.get("gradient_checkpointing") == "off":
        problems.append(
            "--offload-activations with --gradient-checkpointing off: offloading moves the block inputs "
            "that recompute keeps, so it needs recompute; drop --gradient-checkpointing off (offloading "
            "turns recompute on) or drop --offload-activations"
        )
    if values.get("epochs") == 0 and (values.get("max_steps") or -1) <= 0:
        problems.append("--epochs 0: must be above 0, or come with --max-steps N")
    if values.get("pause_at") and (values.get("max_steps") or -1) <= 0:
        problems.append("--pause-at needs --max-steps: the pause is counted in the run's optimizer steps")
    if values.get("learning_rate") and values.get("lr_scale", 1.0) != 1.0:
        problems.append("--learning-rate with --lr-scale: one sets the rate, the other scales it; pass one")
    if values.get("cpu") and values.get("gpu"):
        problems.append("--cpu and --gpu conflict: pass one of them")
    return problems


def run_option_values(args: argparse.Namespace) -> dict[str, Any]:
    """The RunOptions fields the worker's flags fill, by the table."""
    return {flag.dest: flag.option_value(getattr(args, flag.dest)) for flag in FLAGS if flag.run_option}


def flag_text(value: object) -> str:
    # 3.0 epochs reads better as 3; repr keeps every digit of a learning rate.
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


class TrainFlags:
    """The training flags a launch passes to every worker: those given; the others are the worker's
    defaults (reading one gives None). `TrainFlags(seed=1)`, `.replace(seed=2)`, `.argv()`."""

    __slots__ = ("_given",)

    def __init__(self, **given: Any) -> None:
        unknown = [key for key in given if key not in BY_DEST or not BY_DEST[key].passed]
        if unknown:
            raise TypeError(f"TrainFlags got flags it does not pass to workers: {', '.join(unknown)}")
        kept = {key: value for key, value in given.items() if value is not None and value is not False}
        object.__setattr__(self, "_given", kept)

    def __getattr__(self, dest: str) -> Any:
        if dest in BY_DEST and BY_DEST[dest].passed:
            return self._given.get(dest)
        raise AttributeError(dest)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("TrainFlags is frozen: use .replace()")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainFlags) and self._given == other._given

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._given.items())))

    def __repr__(self) -> str:
        return f"TrainFlags({', '.join(f'{k}={v!r}' for k, v in self._given.items())})"

    def effective(self, dest: str) -> Any:
        """The value the worker runs with: the one given, else its default."""
        value = self._given.get(dest)
        return BY_DEST[dest].default if value is None else value

    def given(self) -> dict[str, Any]:
        return dict(self._given)

    def replace(self, **changes: Any) -> TrainFlags:
        return TrainFlags(**{**self._given, **changes})

    def argv(self) -> list[str]:
        """The given flags as worker argv, in the table's order."""
        out: list[str] = []
        for flag in PASSED:
            value = self._given.get(flag.dest)
            if value is True:
                out.append(flag.name)
            elif value is not None:
                out += [flag.name, flag_text(value)]
        return out

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainFlags:
        return cls(**{flag.dest: getattr(args, flag.dest, None) for flag in PASSED})


def lora_flags(sizes: Mapping[str, float]) -> list[tuple[str, str]]:
    """(flag, value) pairs of --lora-rank / --lora-alpha / --lora-dropout for the sizes given."""
    return [(flag_name(f"lora_{key}"), flag_text(value)) for key, value in sorted(sizes.items())]


def worker_default(dest: str) -> Any:
    return BY_DEST[dest].default


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value after the last `flag` in argv, or None."""
    found = None
    for index, word in enumerate(argv[:-1]):
        if word == flag:
            found = argv[index + 1]
    return found
