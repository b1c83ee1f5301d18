"""`recipe-run launch` (the default subcommand): run the recipes, one worker process per recipe, and wait.

    recipe-run --recipes r1,r2,r4 --gpus 0,1,2
    recipe-run --backend ray --ray-address HEAD:6379 --recipes all --output-dir /shared/outputs

Its flags (this module's own, the shared groups of common.py, and every training flag of the one table
in src/contract/flags.py, passed through to each worker), their checks (exit 2 before anything starts),
and the launch: request -> GPUs and memory estimates -> Plan (planning/placement.py) -> a backend and the
run loop (backends/) -> summary.json and the report.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from recipe_runner.backends.base import Backend
from recipe_runner.backends.gpu_pool import GpuPool
from recipe_runner.backends.local import LocalBackend
from recipe_runner.backends.loop import RunPolicy, run_jobs
from recipe_runner.cli import lr_search
from recipe_runner.cli.common import (
    UsageError,
    add_device_flags,
    add_fault_flags,
    add_output_flags,
    add_recipes_file_flag,
    fault_problems,
    range_problems,
    report_or_say,
    use_recipes_file,
)
from recipe_runner.host.gpus import GpuInfo, NvmlUnavailable, probe_cores, probe_gpus
from recipe_runner.host.leases import lease_dir, reservations
from recipe_runner.host.models import ModelUnavailable, local_model
from recipe_runner.planning.estimates import estimate_settings
from recipe_runner.planning.gpu_choice import GpuSelection, select_gpus
from recipe_runner.planning.jobs import WORKER_ENV, JobSpec, new_launch_id, worker_command
from recipe_runner.planning.lora import lora_problems, lora_sizes_from_args
from recipe_runner.planning.makespan import makespan_line, quickest_plan
from recipe_runner.planning.placement import Plan, core_slices, make_plan
from recipe_runner.planning.request import (
    DEFAULT_MAX_JOBS_PER_GPU,
    LaunchRequest,
    PlanError,
    SweepPoint,
    jobs_per_gpu,
    parse_datasets,
    parse_gpu_ids,
    parse_seeds,
    resolve_recipes,
    sweep_points,
)
from recipe_runner.results.live import LiveReporter, PlainReporter
from recipe_runner.results.summary import JobResult, launch_exit_code, render_summary, write_summary
from src.contract.flags import DEFAULT_DATASET, DEFAULT_MODEL, TrainFlags, add_training_flags, value_problems
from src.data.checks import model_and_data_problems, writable_problems
from src.data.dataset import split_sizes
from src.data.records import DatasetError

HELP = "run recipes and wait for them (the default: `recipe-run --recipes ...` is launch)"


def add_flags(p: argparse.ArgumentParser) -> None:
    """Every flag of a launch (`plan` takes the same, to show what a launch would do)."""
    p.add_argument("--recipes", metavar="R[,R...]", help="recipes by key or alias (r1..r4), or all; required")
    add_recipes_file_flag(p)
    add_device_flags(p, DEFAULT_MAX_JOBS_PER_GPU)
    add_backend_flags(p)
    add_output_flags(p)
    add_fault_flags(p)
    add_training_flags(p.add_argument_group("training flags, passed to every worker (default: the worker's)"))
    sweep = p.add_argument_group("sweeps: every recipe runs once per seed and data set")
    sweep.add_argument("--seeds", metavar="S[,S...]", help="e.g. 0,1,2; the report gives mean and spread")
    sweep.add_argument("--datasets", metavar="D[,D...]", help="several data sets, compared side by side")
    lr_search.add_flags(p)
    lora = p.add_argument_group("LoRA size of one recipe (--lora-rank/-alpha/-dropout set every recipe's)")
    lora.add_argument(
        "--lora",
        action="append",
        metavar="[RECIPE:]KEY=V[,KEY=V]",
        help="LoRA sizes for one recipe, e.g. r4:rank=64,alpha=128 (keys: rank, alpha, dropout); repeat "
        "for several; without RECIPE: for every recipe",
    )


def add_backend_flags(p: argparse.ArgumentParser) -> None:
    backend = p.add_argument_group("backend")
    backend.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local (default): subprocesses on this host; ray: the Ray cluster at --ray-address (started "
        "with `ray start --head`; the launcher brings this host's Ray token along)",
    )
    backend.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="with --backend ray: HEAD:6379, auto, or ray://HEAD:10001 "
        "(default $RAY_ADDRESS, else a local Ray)",
    )
    backend.add_argument(
        "--ray-retries",
        type=int,
        default=0,
        metavar="N",
        help="with --backend ray: rerun a recipe whose node was lost, N times (default 0)",
    )


def run(
    args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus, launch_id: str | None = None
) -> int:
    """Launch: check, place, run, report (`launch --dry-run` is `plan`: cli/main.py sends it there).
    `launch_id`: go on with that launch (a learning-rate search's `recipe-run resume`)."""
    request, worker = prepare(args)
    request = _with_local_model(request)
    launch_id, placed, selection, pool = place(args, request, worker, probe, launch_id)
    for name, memory in placed.memory.items():
        print(f"recipe-run: {name}: {memory.describe()}")
    if line := makespan_line(placed):
        print(f"recipe-run: {line}")
    if args.lr_search:
        _backend(args, pool)  # a Ray head is asked now: a bad one exits 2 before anything is written
        rooms = pool.rooms if pool is not None else None
        return lr_search.run(
            args,
            request,
            worker,
            launch_id,
            placed,
            rooms,
            lambda: _backend(args, pool, cpu_jobs=request.jobs),  # as many at once as an untuned launch
            policy_of(args),
        )
    return execute(
        args, launch_id, placed.launch_dir, list(placed.jobs), _backend(args, pool), splits=_splits(request)
    )


def prepare(args: argparse.Namespace) -> tuple[LaunchRequest, list[str]]:
    """The request and the worker command, or exit 2 naming every bad flag and input (nothing written)."""
    use_recipes_file(args)
    if problems := validate(args):
        raise UsageError("\n  ".join(problems), f"see 'recipe-run {args.command} --help'")
    request = request_from_args(args)
    if args.lr_search:
        request = lr_search.eager_trials(request)
    try:
        worker = worker_command()
    except ValueError as error:
        raise UsageError(str(error)) from None
    if problems := preflight_problems(request.flags, request.sweep, request.output_dir):
        raise UsageError("\n  ".join(problems), "fix the input above; nothing was started or written")
    return request, worker


def place(
    args: argparse.Namespace,
    request: LaunchRequest,
    worker: list[str],
    probe: Callable[[], list[GpuInfo]],
    launch_id: str | None = None,
) -> tuple[str, Plan, GpuSelection | None, GpuPool | None]:
    """Ask the GPUs and the memory planner, then place every job: (launch id, Plan, GPUs, their pool)."""
    launch_id = launch_id or new_launch_id()
    selection = None if request.cpu or request.backend == "ray" else select(args, probe)
    pool = gpu_pool(args, selection, probe, launch_id) if selection else None
    try:
        return launch_id, _make_plan(request, launch_id, worker, selection, pool), selection, pool
    except PlanError as error:
        raise UsageError(str(error), error.hint) from None


def validate(args: argparse.Namespace) -> list[str]:
    """Every problem with the launch flags, each naming its flag; empty when they are fine."""
    problems = []
    if not args.recipes:
        problems.append(
            "--recipes is required: name them like --recipes r1,r2 or --recipes all (see 'recipe-run list')"
        )
    else:
        try:
            resolve_recipes(args.recipes)
        except ValueError as error:
            problems.append(f"--recipes: {error}")
    # `--gpus auto --cpu` is allowed: auto is the default, and `make all-recipes ARGS=--cpu` passes both.
    if args.cpu and args.gpus is not None and args.gpus.strip().lower() != "auto":
        problems.append("--cpu and --gpus exclude each other: drop one")
    if args.gpus is not None:
        try:
            parse_gpu_ids(args.gpus)
        except ValueError as error:
            problems.append(str(error))
    if args.cpu and args.gpus_per_recipe not in (None, 1):
        problems.append("--gpus-per-recipe does not apply to --cpu")
    if args.shard and (args.gpus_per_recipe or 1) < 2:
        problems.append("--shard needs --gpus-per-recipe 2 or more: it splits one model over several GPUs")
    if args.batch_size == "auto" and (args.cpu or args.backend == "ray" or args.shard):
        problems.append(
            "--batch-size auto plans against one local GPU's memory: give --batch-size N with --cpu, "
            "--backend ray or --shard"
        )
    problems += _backend_problems(args) + _sweep_problems(args)
    if args.recipes and not any("--recipes" in p for p in problems):
        problems += lora_problems(args)
    problems += range_problems(
        ("--gpus-per-recipe", args.gpus_per_recipe, lambda v: v >= 1, "at least 1"),
        ("--max-jobs-per-gpu", args.max_jobs_per_gpu, lambda v: v >= 1, "at least 1"),
        ("--max-used-mib", args.max_used_mib, lambda v: v >= 0, "0 or more"),
    )
    problems += fault_problems(args) + value_problems(vars(args)) + lr_search.problems(args)
    return problems


def _sweep_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    for flag, value, single, parse in (
        ("--seeds", args.seeds, args.seed, parse_seeds),
        ("--datasets", args.datasets, args.dataset, parse_datasets),
    ):
        if value is None:
            continue
        if single is not None:
            problems.append(f"{flag} and {flag[:-1]} exclude each other: drop one")
        try:
            parse(value)
        except ValueError as error:
            problems.append(str(error))
    return problems


def _backend_problems(args: argparse.Namespace) -> list[str]:
    if args.backend != "ray":
        used = [
            flag
            for flag, value in (("--ray-address", args.ray_address), ("--ray-retries", args.ray_retries))
            if value
        ]
        return [f"{flag} needs --backend ray" for flag in used]
    problems = []
    if args.gpus is not None and args.gpus.strip().lower() != "auto":
        problems.append("--gpus IDS does not apply to --backend ray: Ray picks the GPUs")
    if args.ray_retries < 0:
        problems.append(f"--ray-retries {args.ray_retries}: must be 0 or more")
    if args.wait:
        problems.append("--wait does not apply to --backend ray: Ray queues recipes until GPUs free up")
    return problems


def request_from_args(args: argparse.Namespace) -> LaunchRequest:
    """The launch as asked, read once from the parsed (and validated) flags."""
    flags = TrainFlags.from_args(args)
    if flags.recipes_file:  # every worker resolves the same file, wherever it starts
        flags = flags.replace(recipes_file=str(Path(flags.recipes_file).resolve()))
    seeds = parse_seeds(args.seeds) if args.seeds else None
    datasets = parse_datasets(args.datasets) if args.datasets else None
    return LaunchRequest(
        recipes=tuple(resolve_recipes(args.recipes)),
        flags=flags,
        sweep=tuple(sweep_points(seeds, datasets)),
        output_dir=Path(args.output_dir),
        cpu=args.cpu,
        threads=args.threads,
        backend=args.backend,
        gpus_per_recipe=args.gpus_per_recipe or 1,
        spread=args.gpus_per_recipe is None and not args.cpu and args.backend == "local",
        shard=args.shard,
        pack=args.pack,
        max_jobs_per_gpu=args.max_jobs_per_gpu,
        lora=lora_sizes_from_args(args),
    )


def preflight_problems(flags: TrainFlags, sweep: Sequence[SweepPoint], output_dir: Path) -> list[str]:
    """Bad model, data or output directory, found before any worker starts (and any model loads).

    Hub ids and hub data sets are left to the workers: checking them needs a download. With the
    worker replaced (the RECIPE_RUNNER_WORKER testing hook) only the output directory is checked:
    the stand-in has its own contract.
    """
    problems = writable_problems(output_dir, "--output-dir")
    if os.environ.get(WORKER_ENV):
        return problems
    for dataset in dict.fromkeys(point.dataset or flags.dataset or DEFAULT_DATASET for point in sweep):
        if Path(dataset).exists() or dataset.startswith((".", "/")) or dataset == DEFAULT_DATASET:
            problems += model_and_data_problems(
                flags.model_id or DEFAULT_MODEL,
                dataset,
                flags.skip_bad_records,
                image_root=flags.image_root,
                evaluate=not flags.skip_eval,
            )
    return list(dict.fromkeys(problems))


def _with_local_model(request: LaunchRequest) -> LaunchRequest:
    """The request with a hub model id replaced by its local snapshot, downloaded once before any worker
    starts (the workers then never download); exit 2 when it is neither cached nor downloadable."""
    model_id = request.flags.model_id or DEFAULT_MODEL
    if os.environ.get(WORKER_ENV) or Path(model_id).is_dir():
        return request
    print(f"recipe-run: fetching {model_id} once for every worker (the hub's cache is reused)", flush=True)
    try:
        local = local_model(model_id)
    except ModelUnavailable as error:
        raise UsageError(
            f"--model-id {model_id}: not in the local Hugging Face cache and not downloadable now ({error})",
            "go online (or log in: huggingface-cli login) and run again, or pass --model-id DIR of a local "
            "copy; nothing was started or written",
        ) from None
    return replace(request, flags=request.flags.replace(model_id=local))


def select(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]]) -> GpuSelection:
    """The GPUs this launch may use, or exit 2 saying why there are none (and what to do)."""
    try:
        gpus = probe()
    except NvmlUnavailable as error:
        raise UsageError(
            f"cannot list GPUs: {error}", "no NVIDIA driver here? To train on the CPU instead, add --cpu"
        ) from None
    asked = parse_gpu_ids(args.gpus) if args.gpus is not None else None
    leases = lease_dir()

    def held(gpu: GpuInfo) -> str | None:  # reservations that keep this launch off a GPU
        live = reservations(leases, gpu.uuid)
        blocking = live if args.pack == "off" else [r for r in live if r.exclusive]
        return "; ".join(r.note for r in blocking) or None

    def packable(gpu: GpuInfo) -> bool:  # its processes are other launchers' packed jobs
        return args.pack == "auto" and bool(reservations(leases, gpu.uuid))

    selection = select_gpus(gpus, asked, args.max_used_mib, held, args.gpus_per_recipe or 1, packable)
    if args.pin_cpus == "auto":  # over every GPU of the host, so concurrent launchers agree
        selection = replace(selection, cores=core_slices(gpus, *probe_cores()))
    if problems := selection.problems(args.wait):
        raise UsageError(
            "\n  ".join(problems),
            "add --wait to queue until they free up, pick other --gpus "
            "('recipe-run gpus' shows the free ones), or use --cpu",
        )
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        print("recipe-run: note: CUDA_VISIBLE_DEVICES is ignored here; --gpus picks GPUs", file=sys.stderr)
    return selection


def gpu_pool(
    args: argparse.Namespace, selection: GpuSelection, probe: Callable[[], list[GpuInfo]], launch_id: str
) -> GpuPool:
    max_jobs = jobs_per_gpu(args.pack, args.max_jobs_per_gpu)
    return GpuPool(
        selection.pool, probe, lease_dir(), launch_id, max_jobs, args.max_used_mib, selection.cores
    )


def _make_plan(
    request: LaunchRequest,
    launch_id: str,
    worker: list[str],
    selection: GpuSelection | None,
    pool: GpuPool | None,
) -> Plan:
    """Ask the GPUs (NVML, leases) and the memory planner, then place: the launch's one pure step."""
    cores = os.cpu_count() or 1
    if selection is None or pool is None:
        return make_plan(request, launch_id, worker, None, {}, cores)
    settings = estimate_settings(request, min(gpu.memory_total_mib for gpu in selection.pool))
    return quickest_plan(request, launch_id, worker, pool.rooms(), settings, cores)


def _backend(args: argparse.Namespace, pool: GpuPool | None, cpu_jobs: int | None = None) -> Backend:
    """Where the jobs run; a Ray head is asked once, now, so that a bad one exits 2 before anything starts.
    `cpu_jobs`: on the CPU, at most that many at once (a search's trials)."""
    if args.backend != "ray":
        return LocalBackend(pool, cpu_jobs)
    from recipe_runner.backends.ray import RayBackend, RayConnectError, RayUnavailable, connect

    try:
        connect(args.ray_address)
    except (RayUnavailable, RayConnectError) as error:
        raise UsageError(str(error), "see README.md, 'Many machines: the Ray backend'") from None
    return RayBackend(args.ray_address, args.gpus_per_recipe or 1, args.cpu)


def policy_of(args: argparse.Namespace) -> RunPolicy:
    return RunPolicy(
        grace_s=args.grace,
        oom_retries=args.oom_retries,
        hang_timeout_s=args.hang_timeout,
        kill_hung=args.kill_hung,
        lost_retries=getattr(args, "ray_retries", 0),
    )


def execute(
    args: argparse.Namespace,
    launch_id: str,
    launch_dir: Path,
    specs: list[JobSpec],
    backend: Backend,
    earlier: Sequence[JobResult] = (),
    splits: dict | None = None,
) -> int:
    """Run the jobs, keeping summary.json true while they run; `earlier` are kept results of a resume.
    `splits`: how the data set's splits were made, for summary.json and the report."""
    launch_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"recipe-run: launch {launch_id}: {len(specs)} recipe(s) on {backend.describe()}; "
        f"everything goes to {launch_dir}"
    )
    live = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb" and not args.plain
    reporter = LiveReporter(sys.stdout) if live else PlainReporter(sys.stdout)
    command = ["recipe-run", *args.argv]

    extra = {"splits": splits} if splits else None

    def keep_summary_true(results: list[JobResult]) -> None:
        write_summary(launch_dir, launch_id, _merge(earlier, results), None, command, extra)

    results, signum = run_jobs(specs, backend, reporter, policy_of(args), keep_summary_true)
    results = _merge(earlier, results)
    code = launch_exit_code(results, signum)
    path = write_summary(launch_dir, launch_id, results, code, command, extra)
    print("\n" + render_summary(results))
    print(f"\nsummary: {path}")
    report_or_say(launch_dir)
    return code


def _splits(request: LaunchRequest) -> dict | None:
    """Where a launch's numbers come from: each split of its data set, its size and how it was made;
    None for a hub data set or a sweep over several data sets (each worker reads its own)."""
    datasets = {point.dataset or request.flags.dataset or DEFAULT_DATASET for point in request.sweep}
    (dataset,) = datasets if len(datasets) == 1 else (None,)
    if dataset is None or not Path(dataset).exists():
        return None
    try:
        return split_sizes(dataset, request.flags.image_root)
    except DatasetError:
        return None


def _merge(earlier: Sequence[JobResult], latest: Sequence[JobResult]) -> list[JobResult]:
    """Earlier results with the re-run ones put in their place, in the launch's order."""
    rerun = {r.name: r for r in latest}
    merged = [rerun.pop(r.name, r) for r in earlier]
    return merged + list(rerun.values())
