"""`python -m recipe_runner ...` is `recipe-run ...`; see recipe_runner/cli/main.py."""

from recipe_runner.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
