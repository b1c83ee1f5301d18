"""The user's plan's entry point: train one recipe on one GPU (or the CPU).

    python scripts/train_recipe.py --recipe r1-llm-only --gpu 0
    CUDA_VISIBLE_DEVICES=1 python scripts/train_recipe.py --recipe r2-vision-only
    python scripts/train_recipe.py --recipe r3-two-stage --gpu 0            # both stages, same GPU
    python scripts/train_recipe.py --recipe r3 --checkpoint OUT/stage1-vision/merged   # stage 2 only

A thin shim over src/training/worker.py (flags: --help); `recipe-run` runs several at once.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from src.training.worker import main  # noqa: E402  (torch is not imported here: --gpu is applied first)

if __name__ == "__main__":
    raise SystemExit(main())
