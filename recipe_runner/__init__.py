"""The launcher: runs the fine-tuning recipes as one worker process per recipe on its own GPU(s).

Entry point `recipe-run` (`recipe_runner.cli.main:main`, or `python -m recipe_runner`). No module of
this package imports torch or transformers; see docs/architecture.md for how it meets `src/`.
"""
