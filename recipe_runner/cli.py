"""recipe-run: run the fine-tuning recipes, one worker process per recipe on its own GPU(s).

    recipe-run --recipes r1,r2,r4 --gpus 0,1,2      # same as `recipe-run launch ...`
    python -m recipe_runner plan --recipes all        # what would run where; starts nothing

Subcommands (a literal list, `cli_args.COMMANDS`, where every flag and its checks live): launch (the
default), plan, list, gpus, demo, report, resume, eval, bench, export (eval, bench and export run their
torch modules in a child process).
`recipe-run --help` explains with examples. Exit codes: 0 every recipe succeeded, 1 any did not,
2 bad usage or unusable GPUs (nothing started, nothing written), 130 Ctrl-C, 143 SIGTERM.

Environment: RECIPE_RUNNER_LEASE_DIR (leases.py). Testing hooks: RECIPE_RUNNER_FAKE_GPUS
(gpus.py) fakes NVML, RECIPE_RUNNER_WORKER (plan.py) replaces the worker command.

This module imports no torch and no transformers, so that --help and plan answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from recipe_runner.cli_args import (
    DEMO_BATCH_SIZE,
    DEMO_LEARNING_RATE,
    UsageError,
    parse_args,
    sweep_of_args,
    use_recipes_file_arg,
    validate_launch,
)
from recipe_runner.execute import GpuPool, RunPolicy, run_jobs
from recipe_runner.gpus import GpuInfo, NvmlUnavailable, probe_cores, probe_gpus
from recipe_runner.leases import lease_dir, reservations
from recipe_runner.lora_flags import lora_sizes_from_args
from recipe_runner.placement import (
    LaunchRequest,
    Plan,
    PlanError,
    core_slices,
    jobs_per_gpu,
    make_plan,
    plan_recipes,
)
from recipe_runner.plan import (
    WORKER_ENV,
    GpuSelection,
    JobSpec,
    SweepPoint,
    TrainFlags,
    as_cpu_job,
    flag_value,
    new_launch_id,
    parse_gpu_ids,
    resolve_recipes,
    resume_spec,
    select_gpus,
    split_threads,
    worker_command,
)
from recipe_runner.plan_view import plan_for_sizes, print_plan, print_rows
from recipe_runner.status import LiveReporter, PlainReporter
from recipe_runner.summary import (
    JobResult,
    launch_exit_code,
    read_summary,
    render_summary,
    write_summary,
)
from src.recipes import RECIPE_SOURCES, RECIPES, alias_of


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        return cmd_eval(argv[1:])
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    if argv[:1] == ["export"]:
        return cmd_export(argv[1:])
    try:
        args = parse_args(argv)
        return _COMMANDS[args.command](args)
    except UsageError as error:
        print(f"recipe-run: error: {error}", file=sys.stderr)
        if error.hint:
            print(f"  {error.hint}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except KeyboardInterrupt:
        return 130


def cmd_launch(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> int:
    use_recipes_file_arg(args)
    problems = validate_launch(args)
    if problems:
        raise UsageError("\n  ".join(problems), f"see 'recipe-run {args.command} --help'")
    request = request_from_args(args)
    try:
        worker = worker_command()
    except ValueError as error:
        raise UsageError(str(error)) from None
    if problems := preflight_problems(request.flags, request.sweep, request.output_dir):
        raise UsageError("\n  ".join(problems), "fix the input above; nothing was started or written")
    if args.command == "launch" and not getattr(args, "dry_run", False):
        request = _with_local_model(request)
    if getattr(args, "gpu_memory", None):
        try:
            return plan_for_sizes(request, args.gpu_memory)
        except PlanError as error:
            raise UsageError(str(error), error.hint) from None
    launch_id = new_launch_id()
    selection = None if request.cpu or request.backend == "ray" else _select(args, probe)
    pool = _pool(args, selection, probe, launch_id) if selection else None
    try:
        plan = _make_plan(request, launch_id, worker, selection, pool)
    except PlanError as error:
        raise UsageError(str(error), error.hint) from None
    if args.command == "plan" or getattr(args, "dry_run", False):
        print_plan(plan, selection)
        return 0
    for name, memory in plan.memory.items():
        print(f"recipe-run: {name}: {memory.describe()}")
    if args.backend == "ray":
        _connect_ray(args.ray_address)
    return _execute(args, launch_id, plan.launch_dir, list(plan.jobs), selection, probe)


def _with_local_model(request: LaunchRequest) -> LaunchRequest:
    """The request with a hub model id replaced by its local snapshot, downloaded once before any worker
    starts (the workers then never download); exit 2 when it is neither cached nor downloadable."""
    from recipe_runner.memory import ModelUnavailable, local_model
    from src.training.worker import DEFAULT_MODEL

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
    return replace(request, flags=replace(request.flags, model_id=local))


def request_from_args(args: argparse.Namespace) -> LaunchRequest:
    """The launch as asked, read once from the parsed (and validated) flags."""
    return LaunchRequest(
        recipes=tuple(resolve_recipes(args.recipes)),
        flags=_train_flags(args),
        sweep=tuple(sweep_of_args(args)),
        output_dir=Path(args.output_dir),
        cpu=args.cpu,
        threads=args.threads,
        backend=args.backend,
        gpus_per_recipe=_per_recipe(args),
        spread=args.gpus_per_recipe is None and not args.cpu and args.backend == "local",
        shard=args.shard,
        pack=args.pack,
        max_jobs_per_gpu=args.max_jobs_per_gpu,
        lora=lora_sizes_from_args(args),
    )


def _per_recipe(args: argparse.Namespace) -> int:
    return args.gpus_per_recipe or 1


def _make_plan(request, launch_id, worker, selection: GpuSelection | None, pool: GpuPool | None) -> Plan:
    """Ask the GPUs (NVML, leases) and the memory planner, then place: the launch's one pure step."""
    cores = os.cpu_count() or 1
    if selection is None or pool is None:
        return make_plan(request, launch_id, worker, None, {}, cores)
    memory = plan_recipes(request, min(gpu.memory_total_mib for gpu in selection.pool))
    return make_plan(request, launch_id, worker, pool.rooms(), memory, cores)


def _connect_ray(address: str | None) -> None:
    """Ray installed and the head reachable, or exit 2 before anything is written."""
    from recipe_runner.ray_backend import RayConnectError, RayUnavailable, check_reachable, import_ray

    try:
        import_ray()
        check_reachable(address)
    except (RayUnavailable, RayConnectError) as error:
        raise UsageError(str(error), "see README.md, 'Many machines: the Ray backend'") from None


def preflight_problems(flags: TrainFlags, sweep: Sequence[SweepPoint], output_dir: Path) -> list[str]:
    """Bad model, data or output directory, found before any worker starts (and any model loads).

    Hub ids and hub data sets are left to the workers: checking them needs a download. With the
    worker replaced (the RECIPE_RUNNER_WORKER testing hook) only the output directory is checked:
    the stand-in has its own contract.
    """
    from src.training.checks import model_and_data_problems, writable_problems
    from src.training.worker import DEFAULT_DATASET, DEFAULT_MODEL

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


def _select(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]]) -> GpuSelection:
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

    selection = select_gpus(gpus, asked, args.max_used_mib, held, _per_recipe(args), packable)
    if args.pin_cpus == "auto":  # over every GPU of the host, so concurrent launchers agree
        selection = replace(selection, cores=core_slices(gpus, *probe_cores()))
    problems = selection.problems(args.wait)
    if problems:
        raise UsageError(
            "\n  ".join(problems),
            "add --wait to queue until they free up, pick other --gpus "
            "('recipe-run gpus' shows the free ones), or use --cpu",
        )
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        print("recipe-run: note: CUDA_VISIBLE_DEVICES is ignored here; --gpus picks GPUs", file=sys.stderr)
    return selection


def _train_flags(args: argparse.Namespace) -> TrainFlags:
    return TrainFlags(
        model_id=args.model_id,
        dataset=args.dataset,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=args.learning_rate,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        compile=args.compile,
        dequantize_once=args.dequantize_once,
        offload_activations=args.offload_activations,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        image_root=args.image_root,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        eval_samples=args.eval_samples,
        recipes_file=str(Path(args.recipes_file).resolve()) if args.recipes_file else None,
        skip_bad_records=args.skip_bad_records,
        skip_eval=args.skip_eval,
        no_wandb=args.no_wandb,
    )


def _pool(args: argparse.Namespace, selection: GpuSelection, probe, launch_id: str) -> GpuPool:
    max_jobs = jobs_per_gpu(args.pack, args.max_jobs_per_gpu)
    return GpuPool(
        selection.pool, probe, lease_dir(), launch_id, max_jobs, args.max_used_mib, selection.cores
    )


def _execute(
    args: argparse.Namespace,
    launch_id: str,
    launch_dir: Path,
    specs: list[JobSpec],
    selection: GpuSelection | None,
    probe: Callable[[], list[GpuInfo]],
    earlier: Sequence[JobResult] = (),
) -> int:
    """Run the jobs, keeping summary.json true while they run; `earlier` are kept results of a resume."""
    launch_dir.mkdir(parents=True, exist_ok=True)
    pool = None
    if selection is not None:
        pool = _pool(args, selection, probe, launch_id)
    where = "the CPU" if pool is None else ", ".join(gpu.label for gpu in pool.gpus)
    if getattr(args, "backend", "local") == "ray":
        where = f"the Ray cluster at {args.ray_address or os.environ.get('RAY_ADDRESS') or 'a local Ray'}"
    print(
        f"recipe-run: launch {launch_id}: {len(specs)} recipe(s) on {where}; everything goes to {launch_dir}"
    )
    live = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb" and not args.plain
    reporter = LiveReporter(sys.stdout) if live else PlainReporter(sys.stdout)
    command = ["recipe-run", *args.argv]
    policy = RunPolicy(args.grace, args.oom_retries, args.hang_timeout, args.kill_hung)

    def keep_summary_true(results: list[JobResult]) -> None:
        write_summary(launch_dir, launch_id, _merge(earlier, results), None, command)

    if getattr(args, "backend", "local") == "ray":
        from recipe_runner.ray_backend import run_jobs_ray

        results, signum = run_jobs_ray(
            specs,
            reporter,
            address=args.ray_address,
            gpus_per_job=_per_recipe(args),
            cpu=args.cpu,
            grace_s=args.grace,
            retries_on_node_loss=args.ray_retries,
        )
    else:
        results, signum = run_jobs(specs, pool, reporter, policy=policy, on_change=keep_summary_true)
    results = _merge(earlier, results)
    code = launch_exit_code(results, signum)
    path = write_summary(launch_dir, launch_id, results, code, command)
    print("\n" + render_summary(results))
    print(f"\nsummary: {path}")
    _write_report(launch_dir)
    return code


def _merge(earlier: Sequence[JobResult], latest: Sequence[JobResult]) -> list[JobResult]:
    """Earlier results with the re-run ones put in their place, in the launch's order."""
    rerun = {r.name: r for r in latest}
    merged = [rerun.pop(r.name, r) for r in earlier]
    return merged + list(rerun.values())


def cmd_eval(rest: list[str]) -> int:
    """The evaluator in its own process: it loads torch and models, which the launcher never does."""
    return subprocess.call([sys.executable, "-m", "src.eval.evaluate", *rest])


def cmd_bench(rest: list[str]) -> int:
    """The benchmark in its own process, like eval: it needs torch and a GPU, the launcher neither."""
    return subprocess.call([sys.executable, "-m", "src.bench", *rest])


def cmd_export(rest: list[str]) -> int:
    """The export in its own process, like eval: it loads torch, transformers and peft; the launcher none."""
    return subprocess.call([sys.executable, "-m", "src.export", *rest])


def cmd_resume(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> int:
    """Re-run what did not succeed in LAUNCH_DIR, each from its last checkpoint, on free GPUs."""
    launch_dir = Path(args.launch_dir).resolve()
    summary = read_summary(launch_dir)
    if summary is None:
        raise UsageError(f"{launch_dir}: no summary.json", "pass the <output-dir>/<launch-id> of a launch")
    earlier = [JobResult(**job) for job in summary["jobs"]]
    todo = [r for r in earlier if r.status != "succeeded"]
    if not todo:
        print(f"recipe-run: every recipe of {launch_dir.name} succeeded already; nothing to resume")
        return 0
    specs = [resume_spec(r) for r in todo]
    for path in dict.fromkeys(flag_value(spec.argv, "--recipes-file") for spec in specs):
        args.recipes_file = path  # the launch's own recipes, so that their stages show as before
        use_recipes_file_arg(args)
    cpu = args.cpu or all(r.threads is not None for r in todo)
    args.plain = getattr(args, "plain", False)
    if cpu:
        threads = split_threads(args.threads or os.cpu_count() or 1, len(specs))
        specs, selection = [as_cpu_job(spec, threads) for spec in specs], None
    else:
        selection = _select(args, probe)
    print(f"recipe-run: resuming {', '.join(r.name for r in todo)} of {launch_dir.name}")
    args.argv = ["resume", *args.argv[1:]]
    return _execute(args, summary["launch_id"], launch_dir, specs, selection, probe, earlier)


def _write_report(launch_dir: Path) -> None:
    """The side-by-side report; failing to write it never changes how the launch ended."""
    try:
        from recipe_runner.report import write_report  # imported late: drawing loads matplotlib

        written = write_report(launch_dir)
    except Exception as error:
        print(f"recipe-run: no report ({type(error).__name__}: {error})", file=sys.stderr)
        print(f"  once fixed: recipe-run report {launch_dir}", file=sys.stderr)
        return
    print(f"report:  {written[0]}")


def cmd_report(args: argparse.Namespace) -> int:
    from recipe_runner.report import write_report

    try:
        written = write_report(args.launch_dir)
    except FileNotFoundError as error:
        raise UsageError(
            str(error), "pass the <output-dir>/<launch-id> directory that a launch created"
        ) from None
    for path in written:
        print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    use_recipes_file_arg(args)
    rows = [("alias", "recipe", "trains (how)", "stages", "from", "description")]
    for key, recipe in RECIPES.items():
        stages = " -> ".join(stage.name for stage in recipe.stages) or "-"
        source = RECIPE_SOURCES[key].name if key in RECIPE_SOURCES else "built-in"
        rows.append((alias_of(key) or "-", key, recipe.how(), stages, source, recipe.description))
    print_rows(rows)
    return 0


def cmd_gpus(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> int:
    try:
        gpus = probe()
    except NvmlUnavailable as error:
        print(f"recipe-run: cannot list GPUs: {error}\n  no NVIDIA driver here? Recipes still run with --cpu")
        return 1
    leases = lease_dir()
    verdicts = [_verdict(gpu, args.max_used_mib, reservations(leases, gpu.uuid)) for gpu in gpus]
    if args.json:
        print(
            json.dumps(
                [
                    {**asdict(g), "free": v == "free", "verdict": v}
                    for g, v in zip(gpus, verdicts, strict=True)
                ]
            )
        )
        return 0
    rows = [("index", "name", "uuid", "memory used/total", "util", "processes", "free")]
    for gpu, verdict in zip(gpus, verdicts, strict=True):
        util = "-" if gpu.utilization_pct is None else f"{gpu.utilization_pct}%"
        procs = ",".join(map(str, gpu.processes)) or "-"
        memory = f"{gpu.memory_used_mib}/{gpu.memory_total_mib} MiB"
        rows.append((str(gpu.index), gpu.name, gpu.uuid, memory, util, procs, verdict))
    print_rows(rows)
    if not gpus:
        print("(NVML sees no GPU)")
    return 0


def _verdict(gpu: GpuInfo, max_used_mib: int, live: Sequence) -> str:
    holders = "; ".join(r.note for r in live)
    if any(r.exclusive for r in live):
        return f"no: leased ({holders})"
    if live:
        reserved = sum(r.mib for r in live) / 1024
        return f"shared: {len(live)} packed job(s), {reserved:.1f} GiB reserved ({holders})"
    busy = gpu.busy_reason(max_used_mib)
    return f"no: {busy}" if busy else "free"


def cmd_demo(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]] = probe_gpus) -> int:
    fixtures = Path(args.fixtures)
    model, data = fixtures / "tiny-qwen2-vl", fixtures / "data"
    # Always asked: it keeps fixtures built with the same settings, and rebuilds stale ones.
    print(
        f"recipe-run demo: offline fixtures in {fixtures}/ (built once, about 3 minutes on 2 cores)",
        flush=True,
    )
    built = subprocess.run([sys.executable, "-m", "src.fixtures", "--out", str(fixtures)], check=False)
    if built.returncode != 0:
        print(f"recipe-run demo: building the fixtures failed (exit {built.returncode})", file=sys.stderr)
        return 1
    device = _demo_device(args, probe)
    launch = ["launch", "--recipes", args.recipes, "--model-id", str(model), "--dataset", str(data)]
    launch += ["--max-steps", str(args.max_steps), "--learning-rate", str(DEMO_LEARNING_RATE)]
    launch += ["--batch-size", str(DEMO_BATCH_SIZE), "--no-wandb", "--output-dir", args.output_dir]
    launch += ["--grace", str(args.grace), *device, *(["--plain"] if args.plain else [])]
    print(f"recipe-run demo: recipe-run {shlex.join(launch)}", flush=True)
    return main(launch)


def _demo_device(args: argparse.Namespace, probe: Callable[[], list[GpuInfo]]) -> list[str]:
    """Free GPUs when there are any, else the CPU: the demo must run anywhere."""
    threads = ["--threads", str(args.threads)] if args.threads else []
    if args.cpu:
        return ["--cpu", *threads]
    gpu_flags = ["--max-used-mib", str(args.max_used_mib)]
    gpu_flags += ["--gpus-per-recipe", str(args.gpus_per_recipe)] if args.gpus_per_recipe else []
    gpu_flags += ["--wait"] if args.wait else []
    if args.gpus is not None:
        return ["--gpus", args.gpus, *gpu_flags]
    try:
        free = [gpu for gpu in probe() if gpu.is_free(args.max_used_mib)]
    except NvmlUnavailable:
        free = []
    if len(free) >= _per_recipe(args):
        return ["--gpus", "auto", *gpu_flags]
    print("recipe-run demo: no free GPU here, running on the CPU", flush=True)
    return ["--cpu", *threads]


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "launch": cmd_launch,
    "plan": cmd_launch,
    "list": cmd_list,
    "gpus": cmd_gpus,
    "demo": cmd_demo,
    "report": cmd_report,
    "resume": cmd_resume,
}


if __name__ == "__main__":
    raise SystemExit(main())
