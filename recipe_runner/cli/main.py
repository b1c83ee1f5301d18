"""recipe-run: run the fine-tuning recipes, one worker process per recipe on its own GPU(s).

    recipe-run --recipes r1,r2,r4 --gpus 0,1,2      # same as `recipe-run launch ...`
    python -m recipe_runner plan --recipes all        # what would run where; starts nothing

Each subcommand is one module of this package holding its flags (`add_flags`) and its handler (`run`);
this one only builds the parser from the literal list `SUBCOMMANDS` and dispatches. eval, bench and
export run their torch modules in a child process (tools.py). `recipe-run --help` explains with examples.
Exit codes: 0 every recipe succeeded, 1 any did not, 2 bad usage or unusable GPUs (nothing started,
nothing written), 130 Ctrl-C, 143 SIGTERM.

Environment: RECIPE_RUNNER_LEASE_DIR (host/leases.py). Testing hooks: RECIPE_RUNNER_FAKE_GPUS
(host/gpus.py) fakes NVML, RECIPE_RUNNER_WORKER (planning/jobs.py) replaces the worker command.

This package imports no torch and no transformers, so that --help and plan answer at once.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from recipe_runner.cli import demo, gpus, launch, list_recipes, plan, report, resume, tools
from recipe_runner.cli.common import Parser, UsageError, unrecognized

SUBCOMMANDS: dict[str, ModuleType] = {
    "launch": launch,
    "plan": plan,
    "list": list_recipes,
    "gpus": gpus,
    "demo": demo,
    "report": report,
    "resume": resume,
}
COMMANDS = (*SUBCOMMANDS, *tools.MODULES)

EXAMPLES = """\
examples:
  recipe-run --recipes r1,r2,r4 --gpus 0,1,2        three recipes, one GPU each, at once
  recipe-run --recipes all --gpus auto --wait         every recipe on the free GPUs, queueing
  recipe-run --recipes r3 --gpus 0 --model-id Qwen/Qwen2-VL-2B-Instruct --dataset data/train.json
  recipe-run --recipes r4 --gpus 0,1 --gpus-per-recipe 2     one model sharded over two GPUs
  recipe-run --recipes r1,r3 --cpu --max-steps 5      on the CPU, threads split between recipes
  recipe-run --backend ray --ray-address HEAD:6379 --recipes all   on a Ray cluster (`ray start --head`)
  recipe-run plan --recipes all                       which recipe goes where, commands, env
  recipe-run gpus                                     what NVML sees, which GPUs are free
  recipe-run list                                     the recipes and what each trains
  recipe-run --recipes-file my.toml --recipes r4,r5   recipes of your own beside the built-in ones
  recipe-run demo                                     tiny offline model and data, all four recipes
  recipe-run report outputs/20261126-041500-ab12      the side-by-side report of a launch again
  recipe-run bench --shape 7b --shape 2b              tokens/s, memory, MFU per recipe vs the plain loop
  recipe-run export outputs/20261126-041500-ab12 --out winner/   the winner as a standalone model

Recipes: r1 (r1-llm-only), r2 (r2-vision-only), r3 (r3-two-stage), r4 (r4-joint), or all; more
from --recipes-file FILE (TOML, the schema of src/recipes.toml; README.md, 'Your own recipes').
Each run writes <output-dir>/<launch-id>/: one directory per recipe (the worker's output),
logs/<recipe>.log, and summary.json. Exit: 0 all succeeded, 1 some failed, 2 bad usage,
130 interrupted. GPU leases live in $RECIPE_RUNNER_LEASE_DIR (default /tmp/recipe-runner-leases).
Every flag of a subcommand: recipe-run launch --help (plan, demo and gpus alike).
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in tools.MODULES:
        return tools.run(argv[0], argv[1:])
    try:
        args = parse_args(argv)
        if args.command == "demo":
            return main(demo.launch_argv(args))
        if args.command == "launch" and args.dry_run:
            return plan.run(args)
        if args.command == "resume" and (searched := resume.searched_launch(args)) is not None:
            launch_dir, argv = searched  # a learning-rate search goes on where it stopped, as launched
            again = parse_args(argv)
            again.output_dir, again.argv = str(launch_dir.parent), ["resume", str(launch_dir)]
            return launch.run(again, launch_id=launch_dir.name)
        return SUBCOMMANDS[args.command].run(args)
    except UsageError as error:
        print(f"recipe-run: error: {error}", file=sys.stderr)
        if error.hint:
            print(f"  {error.hint}", file=sys.stderr)
        return 2
    except demo.FixturesFailed as error:
        print(error, file=sys.stderr)
        return 1
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except KeyboardInterrupt:
        return 130


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    parser = Parser(
        prog="recipe-run",
        usage="recipe-run [launch] --recipes R[,R...] [--gpus IDS|auto | --cpu] [options]\n"
        "       recipe-run {plan,list,gpus,demo,report,resume,eval,bench,export} [options]",
        description="Run Qwen2-VL fine-tuning recipes, one worker process per recipe on its own GPU(s).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=Parser, prog="recipe-run"
    )
    helps = {name: module.HELP for name, module in SUBCOMMANDS.items()}
    helps |= {name: text for name, (_module, text) in tools.MODULES.items()}
    subs = {
        name: sub.add_parser(
            name,
            help=text,
            description=text,
            allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for name, text in helps.items()
    }
    for name, module in SUBCOMMANDS.items():
        module.add_flags(subs[name])
    subs["launch"].add_argument("--dry-run", action="store_true", help="same as the plan subcommand")
    return parser, subs


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser, subs = build_parser()
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        if argv and not argv[0].startswith("-"):
            raise UsageError(
                f"unknown subcommand {argv[0]!r}; choose from {', '.join(COMMANDS)}",
                "see 'recipe-run --help'",
            )
        argv = ["launch", *argv]
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise UsageError(unrecognized(extra, subs[args.command]), f"see 'recipe-run {args.command} --help'")
    args.argv = argv
    return args


if __name__ == "__main__":
    raise SystemExit(main())
