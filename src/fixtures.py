"""Build the offline fixtures: a tiny random Qwen2-VL and a synthetic shapes data set.

    python -m src.fixtures                 # writes fixtures/tiny-qwen2-vl and fixtures/data
    python -m src.fixtures --out DIR --force

Nothing is downloaded. Existing fixtures are kept unless --force.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

MODEL_DIR, DATA_DIR = "tiny-qwen2-vl", "data"


def build_fixtures(out: Path, force: bool = False, train: int = 32, test: int = 16) -> tuple[Path, Path]:
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
    args = parser.parse_args(argv)
    model_dir, data_dir = build_fixtures(Path(args.out), args.force)
    print(f"model:   {model_dir}\ndataset: {data_dir}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
