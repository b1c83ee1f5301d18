"""The worker's flags, defined once (src/contract/flags.py): the worker's parser, recipe-run's pass-through
flags, TrainFlags and RunOptions all come from the one table, and nothing else writes a flag's name."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from src.contract.flags import BY_DEST, FLAGS, PASSED, TrainFlags, value_problems
from tests.conftest import REPO


def worker_parser():
    from src.training.worker import build_parser

    return build_parser()


def launch_parser():
    from recipe_runner.cli.main import build_parser

    _parser, subs = build_parser()
    return subs["launch"]


def options(parser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def test_every_flag_is_on_the_worker_and_every_passed_flag_on_recipe_run():
    assert {flag.name for flag in FLAGS} <= options(worker_parser())
    launcher = options(launch_parser())
    assert {flag.name for flag in PASSED} <= launcher
    assert {"--lora-rank", "--lora-alpha", "--lora-dropout"} <= launcher


def test_every_run_option_flag_fills_a_run_options_field_of_its_name():
    from src.training.options import RunOptions

    fields = {field.name for field in dataclasses.fields(RunOptions)}
    marked = {flag.dest for flag in FLAGS if flag.run_option}
    assert marked and marked <= fields


def test_the_worker_builds_run_options_from_its_flags_by_the_table(tmp_path):
    from src.training.worker import run_options

    argv = ["--recipe", "r4", "--max-steps", "7", "--compile", "off", "--offload-activations", "--seed", "3"]
    args = worker_parser().parse_args([*argv, "--max-pixels", "50176", "--gradient-checkpointing", "on"])
    opts = run_options(args, "cpu", tmp_path, wandb_on=False)
    assert (opts.max_steps, opts.compile, opts.offload_activations, opts.seed) == (7, False, True, 3)
    assert (opts.max_pixels, opts.gradient_checkpointing, opts.dequantize_once) == (50176, True, None)
    assert (opts.output_dir, opts.device) == (tmp_path, "cpu")


@pytest.mark.parametrize(
    "given, wanted", [([], None), (["--group-by-size", "on"], True), (["--group-by-size", "off"], False)]
)
def test_group_by_size_is_auto_unless_given_and_reaches_run_options(tmp_path, given, wanted):
    from src.training.worker import run_options

    args = worker_parser().parse_args(["--recipe", "r4", *given])
    assert run_options(args, "cuda", tmp_path, wandb_on=False).group_by_size is wanted
    if given:  # recipe-run passes it through to every worker as given
        parsed = launch_parser().parse_args(["--recipes", "r4", *given])
        assert TrainFlags.from_args(parsed).argv() == given


def test_train_flags_pass_to_the_worker_as_the_worker_reads_them():
    given = TrainFlags(
        max_steps=5,
        learning_rate=3e-05,
        compile="on",
        offload_activations=True,
        epochs=2.0,
        image_root="imgs",
    )
    argv = given.argv()
    assert argv[:2] == ["--epochs", "2"] and "--offload-activations" in argv
    parsed = worker_parser().parse_args(["--recipe", "r1", *argv])
    assert {dest: getattr(parsed, dest) for dest in given.given()} == given.given()
    assert given.effective("batch_size") == BY_DEST["batch_size"].default and given.batch_size is None


def test_train_flags_refuse_what_a_worker_is_not_passed():
    with pytest.raises(TypeError, match="output_dir"):
        TrainFlags(output_dir="x")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"max_steps": 0}, "--max-steps 0: must be at least 1, or -1 for --epochs"),
        ({"learning_rate": 2.0}, "--learning-rate 2.0: must be between 0 and 1"),
        ({"lora_dropout": 1.0}, "--lora-dropout 1.0: must be in [0, 1)"),
        ({"min_pixels": 5000, "max_pixels": 4000}, "--min-pixels 5000 is above --max-pixels 4000"),
        ({"offload_activations": True, "gradient_checkpointing": "off"}, "--offload-activations with"),
        ({"epochs": 0}, "--epochs 0: must be above 0, or come with --max-steps N"),
        ({"learning_rate": 1e-4, "lr_scale": 3.0}, "--learning-rate with --lr-scale"),
    ],
)
def test_one_check_names_the_bad_flag_for_worker_and_launcher(values, message):
    assert any(message in problem for problem in value_problems(values))


def test_recipe_run_and_the_worker_refuse_a_bad_value_with_the_same_words(tmp_path):
    from recipe_runner.cli.main import main as recipe_run

    worker = subprocess.run(
        [sys.executable, "-m", "src.training.worker", "--recipe", "r1", "--logging-steps", "0", "--cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert worker.returncode == 2 and "--logging-steps 0: must be at least 1" in worker.stderr
    assert recipe_run(["plan", "--recipes", "r1", "--cpu", "--logging-steps", "0"]) == 2


@pytest.mark.parametrize(
    "literal",
    ['"--offload-activations"', '"--max-pixels"', '"--compile"', '"--dequantize-once"', '"--group-by-size"'],
)
def test_a_flag_name_is_written_in_one_source_file(literal):
    sources = [p for folder in ("recipe_runner", "src", "scripts") for p in (REPO / folder).rglob("*.py")]
    holding = [str(p.relative_to(REPO)) for p in sources if literal in p.read_text()]
    assert holding == [str(Path("src/contract/flags.py"))]
