"""`python -m recipe_runner ...` is `recipe-run ...`; see recipe_runner/cli.py."""

from recipe_runner.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
