"""Build the offline fixtures: a tiny Qwen2-VL that already detects shapes, and data to fine-tune it on.

    python -m src.fixtures                 # fixtures/tiny-qwen2-vl, fixtures/data, fixtures/source-data
    python -m src.fixtures --out DIR --force

Nothing is downloaded. The tiny model is built here (its own tokenizer, processor and chat template)
and pretrained from scratch on plain shapes (`source-data`), so that the demo's recipes start from a
model that can see; `data` is the shifted target domain the recipes fine-tune on and are judged on.
About 3 minutes on 2 CPU cores, once: existing fixtures built with the same settings are kept.

`build_test_fixtures` makes the small random-weight model and data set the test suite uses.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

MODEL_DIR, DATA_DIR = "tiny-qwen2-vl", "data"


def build_test_fixtures(out: Path, force: bool = False, train: int = 32, test: int = 16) -> tuple[Path, Path]:
    """A random tiny Qwen2-VL and a shapes data set under `out` (seconds; for tests)."""
    from src.data.synthetic import write_dataset
    from src.models.tiny import build_tiny_model

    model_dir, data_dir = out / MODEL_DIR, out / DATA_DIR
    if force:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir)
    if not (data_dir / "test" / "metadata.jsonl").is_file():
        write_dataset(data_dir, train=train, test=test)
    return model_dir, data_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.fixtures", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fixtures", help="output directory (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the fixtures exist")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    import logging

    import torch

    from src.models.pretrain import build_detector_fixtures

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir, data_dir, source_dir = build_detector_fixtures(Path(args.out), args.force)
    print(f"model:       {model_dir}\ndataset:     {data_dir}\nsource data: {source_dir}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
