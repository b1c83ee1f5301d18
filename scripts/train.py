"""One training run from explicit flags instead of a named recipe.

    python scripts/train.py --train-llm lora --quantized --learning-rate 2e-4 --gpu 0 --dataset DIR
    python scripts/train.py --train-vision lora --train-merger lora --lora-rank 32 --cpu \
        --model-id fixtures/tiny-qwen2-vl --dataset fixtures/data --max-steps 4 --no-wandb

Every flag of scripts/train_recipe.py works here too, except --recipe; the run is named "custom".
"""

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from src.contract.exits import USAGE  # noqa: E402
from src.recipes import PART_MODES, TrainingRecipe  # noqa: E402
from src.training.worker import main  # noqa: E402


def recipe_from_flags(argv: list[str] | None) -> tuple[TrainingRecipe, list[str]]:
    parser = argparse.ArgumentParser(prog="train.py", add_help=False)
    for part in ("vision", "merger", "llm"):
        parser.add_argument(f"--train-{part}", choices=PART_MODES, default="frozen")
    parser.add_argument("--quantized", action="store_true", help="4-bit nf4 LLM (QLoRA)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--name", default="custom")
    known, rest = parser.parse_known_args(argv)
    recipe = TrainingRecipe(
        name=known.name,
        description="from scripts/train.py flags",
        quantized=known.quantized,
        train_vision=known.train_vision,
        train_merger=known.train_merger,
        train_llm=known.train_llm,
        lora_rank=known.lora_rank,
        lora_alpha=known.lora_alpha,
        lora_dropout=known.lora_dropout,
        learning_rate=2e-4,
    )
    return recipe, rest


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

if __name__ == "__main__":
    custom, remaining = recipe_from_flags(sys.argv[1:])
    if not SAFE_NAME.fullmatch(custom.name):
        print(
            f"error: --name {custom.name!r}: use letters, digits, '.', '_' and '-' (it names the output "
            "directory, so it may not contain '/' or start with '.')",
            file=sys.stderr,
        )
        raise SystemExit(USAGE)
    if "-h" in remaining or "--help" in remaining:
        print(
            "Recipe flags: --train-vision/--train-merger/--train-llm {frozen,lora}, --quantized, "
            "--lora-rank N, --lora-alpha N, --lora-dropout P, --name NAME. Training flags:"
        )
    if "--recipe" in remaining:
        print(
            "error: scripts/train.py takes no --recipe; use scripts/train_recipe.py for named recipes",
            file=sys.stderr,
        )
        raise SystemExit(USAGE)
    raise SystemExit(main(remaining, recipe=custom, prog="train.py"))
