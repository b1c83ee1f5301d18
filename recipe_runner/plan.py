"""Pure planning: recipes + GPUs + options -> one `JobSpec` per recipe (argv, env, paths).

Nothing here touches a process, a file or NVML; the executor (`execute.py`) runs the specs and
the CLI prints them for `plan` / `--dry-run`. GPU jobs are planned without a device and bound to
GPUs (`bind_gpus`) only when they start, because with more recipes than GPUs the queue decides
at run time which GPU frees first.

Testing hook: env `RECIPE_RUNNER_WORKER` (a JSON list, e.g. `["python", "tests/fakes/worker.py"]`)
replaces the worker command `[sys.executable, "-m", "src.training.worker"]`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from recipe_runner.gpus import GpuInfo
from src.recipes import RECIPES, resolve_recipe
from src.training.distributed import NO_MULTICAST_ENV  # torch-free at import
from src.training.worker import DEFAULT_BATCH_SIZE, DEFAULT_GRAD_ACCUM  # torch-free at import

WORKER_ENV = "RECIPE_RUNNER_WORKER"
BASELINE_DIR = "base"  # <launch>/base: the untrained model's metrics on the test split


# Every child gets these: whole lines as they are printed, and no NVLink multicast, which
# hangs or fails on the lent multi-GPU machines (see docs/facts.md, NVML section).
BASE_ENV = {"PYTHONUNBUFFERED": "1", **NO_MULTICAST_ENV}


@dataclass(frozen=True)
class TrainFlags:
    """The worker's training flags passed through unchanged; None = the worker's default."""

    model_id: str | None = None
    dataset: str | None = None
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    learning_rate: float | None = None
    seed: int | None = None
    gradient_checkpointing: str | None = None  # "auto" | "on" | "off"
    compile: str | None = None  # "auto" | "on" | "off"
    dequantize_once: str | None = None  # "auto" | "on" | "off"
    offload_activations: bool = False  # recompute on, block inputs in host memory
    image_root: str | None = None  # where the data set's images are, when not found beside it
    min_pixels: int | None = None  # image resize limits
    max_pixels: int | None = None
    save_steps: int | None = None
    logging_steps: int | None = None
    eval_samples: int | None = None
    recipes_file: str | None = None  # absolute path: the workers add the same recipes the launcher did
    skip_bad_records: bool = False
    skip_eval: bool = False
    no_wandb: bool = False

    def argv(self) -> list[str]:
        out: list[str] = []
        for item in fields(self):
            value = getattr(self, item.name)
            flag = "--" + item.name.replace("_", "-")
            if value is True:
                out.append(flag)
            elif value is not None and value is not False:
                out += [flag, _flag_text(value)]
        return out


def _flag_text(value: object) -> str:
    # 3.0 epochs reads better as 3; repr keeps every digit of a learning rate.
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


@dataclass(frozen=True)
class JobSpec:
    """One worker process: everything needed to start it, nothing about how it went."""

    recipe: str  # key in src.recipes.RECIPES
    argv: tuple[str, ...]
    env: dict[str, str] = field(hash=False)  # added to the launcher's environment
    output_dir: Path  # the worker's --output-dir
    log_path: Path  # the child's stdout+stderr, as the launcher saw it
    gpus: tuple[GpuInfo, ...] = ()  # empty until bound; always empty on CPU
    threads: int | None = None  # CPU threads, for --cpu jobs
    name: str | None = None  # the job's name when a sweep runs a recipe several times
    gpu_count: int = 1  # GPUs it needs at once: data-parallel ranks, or a model sharded over several
    reserve_mib: int | None = None  # GPU memory it reserves on each of them; None: the GPUs whole
    predicted_s: float = 0.0  # predicted training seconds (0: unknown); the longest starts first
    cpus: tuple[int, ...] = ()  # the cores it is pinned to (its GPUs' share, placement.core_slices); () none

    @property
    def key(self) -> str:
        """What names this job everywhere: its directory, log, row. The recipe, unless swept."""
        return self.name or self.recipe

    @property
    def device(self) -> str:
        if self.threads is not None:
            return "cpu"
        if not self.gpus:
            return "gpu?"
        return "gpu" + ",".join(str(gpu.index) for gpu in self.gpus)


def resolve_recipes(text: str) -> list[str]:
    """Recipe keys from "r1,r3-two-stage" or "all", in the order given; a recipe named twice is an error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("no recipe named; use e.g. --recipes r1,r2 or --recipes all")
    keys: list[str] = []
    for name in names:
        try:
            found = list(RECIPES) if name == "all" else [resolve_recipe(name).name]
        except KeyError as error:
            raise ValueError(f"{error.args[0]}, or all") from None
        twice = [key for key in found if key in keys]
        if twice:
            raise ValueError(f"{twice[0]} is named twice; name each recipe once (or use all alone)")
        keys += found
    return keys


def parse_gpu_ids(text: str) -> list[int] | None:
    """[0, 2] from "0,2"; None for "auto" (every free GPU). ValueError otherwise."""
    if text.strip().lower() == "auto":
        return None
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--gpus {text!r}: give GPU indices like 0,1,2 or 'auto'") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"--gpus {text!r}: give GPU indices like 0,1,2 or 'auto'")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus {text!r} names a GPU twice")
    return ids


def worker_command(environ: Mapping[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    override = environ.get(WORKER_ENV)
    if not override:
        return [sys.executable, "-m", "src.training.worker"]
    command = json.loads(override)
    if not (isinstance(command, list) and command and all(isinstance(part, str) for part in command)):
        raise ValueError(f"{WORKER_ENV} must be a JSON list of strings, got {override!r}")
    return command


def new_launch_id(now: float | None = None) -> str:
    """Sortable and unique enough for two launches in the same second: 20261126-041500-ab12."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{stamp}-{secrets.token_hex(2)}"


def split_threads(total: int, jobs: int) -> int:
    """CPU threads per worker when `jobs` workers share `total` cores (at least one each)."""
    return max(1, total // max(1, jobs))


@dataclass(frozen=True)
class SweepPoint:
    """One (seed, dataset) a sweep runs every recipe at; `tag` tells its jobs apart."""

    seed: int | None = None
    dataset: str | None = None
    tag: str = ""
    data_tag: str = ""  # the data set's part of the tag, shared by its seeds


def sweep_points(seeds: Sequence[int] | None, datasets: Sequence[str] | None) -> list[SweepPoint]:
    """Every seed x dataset pair; tags only name what varies (no sweep: one untagged point)."""
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    data_list: list[str | None] = list(datasets) if datasets else [None]
    data_tags = _dataset_tags(data_list) if len(data_list) > 1 else {}
    points = []
    for dataset in data_list:
        data_tag = f"-{data_tags[dataset]}" if data_tags else ""
        for seed in seed_list:
            tag = data_tag + (f"-seed{seed}" if len(seed_list) > 1 else "")
            points.append(SweepPoint(seed, dataset, tag, data_tag))
    return points


def _dataset_tags(datasets: Sequence[str | None]) -> dict[str | None, str]:
    """Short, path-safe names for data sets: their base names, numbered where two coincide."""
    names = [
        re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(d).rstrip("/")).name).strip("._") or "data"
        for d in datasets
    ]
    if len(set(names)) < len(names):
        names = [f"d{i}-{name}" for i, name in enumerate(names)]
    return dict(zip(datasets, names, strict=True))


def plan_jobs(
    recipes: Sequence[str],
    launch_dir: Path,
    flags: TrainFlags,
    worker: Sequence[str],
    cpu_threads: int | None = None,
    gpu_job_threads: int | None = None,
    sweep: Sequence[SweepPoint] = (SweepPoint(),),
    lora: Mapping[str, Mapping[str, float]] | None = None,
) -> list[JobSpec]:
    """One spec per recipe and sweep point. With `cpu_threads` the jobs are complete CPU jobs;
    otherwise each still needs `bind_gpus` before it can start, and `gpu_job_threads` caps its
    CPU threads. `lora` gives a recipe key its LoRA sizes ({"rank": 64, ...}) as worker flags."""
    jobs = []
    for point in sweep:
        point_flags = replace(
            flags,
            seed=flags.seed if point.seed is None else point.seed,
            dataset=flags.dataset if point.dataset is None else point.dataset,
        )
        for key in recipes:
            job = _plan_job(key, point.tag, launch_dir, point_flags, worker, cpu_threads, gpu_job_threads)
            jobs.append(with_lora_flags(job, (lora or {}).get(key, {})))
    return with_baselines(jobs, sweep, launch_dir, flags)


def with_baselines(
    jobs: list[JobSpec], sweep: Sequence[SweepPoint], launch_dir: Path, flags: TrainFlags
) -> list[JobSpec]:
    """The first job of each data set also evaluates the untrained base model (the zero-shot
    baseline of the report) into <launch>/base, or <launch>/base-<data set> in a data-set sweep."""
    if flags.skip_eval or not jobs:
        return jobs
    per_point = len(jobs) // len(sweep)
    out, seen = list(jobs), set()
    for index, point in enumerate(sweep):
        if point.dataset in seen:
            continue
        seen.add(point.dataset)
        first = index * per_point
        target = launch_dir / (BASELINE_DIR + point.data_tag)
        out[first] = replace(out[first], argv=with_flag(out[first].argv, "--baseline-dir", str(target)))
    return out


def _plan_job(
    key: str,
    tag: str,
    launch_dir: Path,
    flags: TrainFlags,
    worker: Sequence[str],
    cpu_threads: int | None,
    gpu_job_threads: int | None,
) -> JobSpec:
    name = key + tag
    output_dir = launch_dir / name
    argv = [*worker, "--recipe", key, "--output-dir", str(output_dir), *flags.argv()]
    env = dict(BASE_ENV)
    if cpu_threads is not None:
        argv += ["--cpu", "--threads", str(cpu_threads)]
        env.update(cpu_env(cpu_threads))
    log = launch_dir / "logs" / f"{name}.log"
    job = JobSpec(key, tuple(argv), env, output_dir, log, (), cpu_threads, name if tag else None)
    return job if gpu_job_threads is None else with_gpu_threads(job, gpu_job_threads)


def with_gpu_threads(job: JobSpec, threads: int) -> JobSpec:
    """A GPU job capped at `threads` CPU threads.

    Each GPU worker still preprocesses images on the CPU; with every worker taking all cores (torch's
    default) four workers ran r3 1.7x slower than alone (docs/benchmarks.md).
    """
    return replace(
        job, argv=with_flag(job.argv, "--threads", str(threads)), env={**job.env, **thread_env(threads)}
    )


DISTRIBUTED_MODULE = "src.training.distributed"


def as_data_parallel(job: JobSpec, ranks: int, worker: Sequence[str]) -> JobSpec:
    """The job run as `ranks` data-parallel processes (one per GPU) by src.training.distributed.

    The worker's own flags follow `--`; a replaced worker command (the testing hook) gets the same
    prefix, so the fake can tell how many ranks it stands for.
    """
    head = list(worker)
    if head[-2:] == ["-m", "src.training.worker"]:
        head[-1] = DISTRIBUTED_MODULE
    flags = job.argv[len(worker) :]
    argv = (*head, "--nproc-per-node", str(ranks), "--", *flags)
    return replace(job, argv=argv, gpu_count=ranks)


def with_lora_flags(job: JobSpec, sizes: Mapping[str, float]) -> JobSpec:
    """The job with --lora-rank / --lora-alpha / --lora-dropout for each size given."""
    argv = job.argv
    for key, value in sorted(sizes.items()):
        argv = with_flag(argv, f"--lora-{key}", _flag_text(value))
    return replace(job, argv=argv)


def thread_env(threads: int) -> dict[str, str]:
    # RAYON: the fast tokenizers' pool, which otherwise starts one spinning thread per core.
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "RAYON_NUM_THREADS": str(threads),
    }


def cpu_env(threads: int) -> dict[str, str]:
    # Empty CUDA_VISIBLE_DEVICES: a --cpu job must not open a CUDA context on someone's GPU 0.
    return {"CUDA_VISIBLE_DEVICES": "", **thread_env(threads)}


def gpu_env(gpus: Sequence[GpuInfo]) -> dict[str, str]:
    # UUIDs, not indices: NVML's order need not match CUDA's, a UUID names one board everywhere.
    # Expandable segments keep the caching allocator's unused blocks small, so that a process holds
    # little more than the planner's predicted peak: what packing several jobs on one GPU relies on.
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(gpu.uuid for gpu in gpus),
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    }


def bind_gpus(
    job: JobSpec, gpus: Sequence[GpuInfo], cores: Mapping[str, tuple[int, ...]] | None = None
) -> JobSpec:
    """The job on these GPUs: their env, and the cores of their share (`cores`: GPU uuid -> cores)."""
    cpus = sorted({cpu for gpu in gpus for cpu in (cores or {}).get(gpu.uuid, ())})
    return replace(job, gpus=tuple(gpus), env={**job.env, **gpu_env(gpus)}, cpus=tuple(cpus))


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value after the last `flag` in argv, or None."""
    found = None
    for index, word in enumerate(argv[:-1]):
        if word == flag:
            found = argv[index + 1]
    return found


def with_flag(argv: Sequence[str], flag: str, value: str | None = None) -> tuple[str, ...]:
    """argv with `flag` (and its value) set once: replaced where present, else appended."""
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == flag:
            skip = value is not None
        else:
            out.append(word)
    return (*out, flag, *([] if value is None else [value]))


def resume_spec(result) -> JobSpec:
    """The job of an earlier launch's summary entry, continuing from its last checkpoint.

    A worker that never wrote status.json had nothing to resume: it starts afresh.
    """
    env = {k: v for k, v in result.env.items() if k not in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    job = JobSpec(
        result.recipe,
        tuple(result.argv),
        env,
        Path(result.output_dir),
        Path(result.log),
        name=result.name if result.name != result.recipe else None,
        gpu_count=max(1, len(result.gpu_uuids)),  # its GPUs whole again: a resume does not pack
    )
    has_run = (job.output_dir / "status.json").is_file()
    return resumed(job) if has_run else job


def as_cpu_job(job: JobSpec, threads: int) -> JobSpec:
    argv = with_flag(with_flag(job.argv, "--cpu"), "--threads", str(threads))
    return replace(job, argv=argv, env={**job.env, **cpu_env(threads)}, threads=threads, gpus=())


def resumed(job: JobSpec) -> JobSpec:
    """The same job continuing in its output directory from its last checkpoint."""
    return replace(job, argv=with_flag(job.argv, "--resume"))


def oom_retry(job: JobSpec) -> JobSpec | None:
    """After CUDA OOM: half the micro-batch, twice the accumulation (the same effective batch),
    resuming from the last checkpoint. None when the micro-batch is already 1."""
    batch = int(flag_value(job.argv, "--batch-size") or DEFAULT_BATCH_SIZE)
    accum = int(flag_value(job.argv, "--grad-accum") or DEFAULT_GRAD_ACCUM)
    if batch <= 1:
        return None
    argv = with_flag(job.argv, "--batch-size", str(batch // 2))
    argv = with_flag(argv, "--grad-accum", str(accum * 2 if batch % 2 == 0 else accum * batch))
    if batch % 2:  # an odd batch cannot halve exactly: go to 1 x (batch * accum)
        argv = with_flag(argv, "--batch-size", "1")
    return resumed(replace(job, argv=argv))


@dataclass(frozen=True)
class GpuSelection:
    """The GPUs a launch may use, or why it cannot start."""

    pool: tuple[GpuInfo, ...]
    missing: tuple[str, ...] = ()  # fatal: asked for GPUs that do not exist
    busy: tuple[str, ...] = ()  # fatal unless --wait
    cores: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # GPU uuid -> its jobs' cores

    def problems(self, wait: bool) -> list[str]:
        return [*self.missing, *([] if wait else self.busy)]


def select_gpus(
    gpus: Sequence[GpuInfo],
    asked: list[int] | None,
    max_used_mib: int,
    leased_by: Callable[[GpuInfo], str | None],
    per_job: int = 1,
    packable: Callable[[GpuInfo], bool] = lambda gpu: False,
) -> GpuSelection:
    """The pool for a launch: the asked-for GPUs, or with `asked=None` every free one (every
    one, to wait on, when none is free). `leased_by` names another launcher's reservations that keep
    a GPU from this launch (with packing, only a GPU held whole; its other GPUs' room is placement's).
    `packable` GPUs carry other launchers' packed jobs: their processes do not make them busy."""
    busy_of = functools.partial(_why_busy, max_used_mib=max_used_mib, leased_by=leased_by, packable=packable)
    by_index = {gpu.index: gpu for gpu in gpus}
    if asked is None:
        return _select_auto(gpus, busy_of, per_job)
    missing = [i for i in asked if i not in by_index]
    if missing:
        have = ", ".join(str(i) for i in sorted(by_index)) or "none"
        return GpuSelection(
            (), (f"no GPU with index {', '.join(map(str, missing))} (this host has: {have})",)
        )
    pool = tuple(by_index[i] for i in asked)
    busy = [f"{gpu.label} ({gpu.uuid}) is busy: {why}" for gpu in pool if (why := busy_of(gpu))]
    return GpuSelection(pool, _too_few(pool, per_job), tuple(busy))


def _select_auto(
    gpus: Sequence[GpuInfo], busy_of: Callable[[GpuInfo], str | None], per_job: int
) -> GpuSelection:
    if not gpus:
        return GpuSelection((), ("NVML sees no GPU on this host",))
    free = tuple(gpu for gpu in gpus if not busy_of(gpu))
    if len(free) >= per_job:
        return GpuSelection(free)
    busy = [f"{gpu.label} is busy: {why}" for gpu in gpus if (why := busy_of(gpu))]
    short = f"--gpus auto found {len(free)} free GPU(s), a recipe needs {per_job}"
    return GpuSelection(tuple(gpus), _too_few(tuple(gpus), per_job), (short, *busy))


def _why_busy(
    gpu: GpuInfo,
    max_used_mib: int,
    leased_by: Callable[[GpuInfo], str | None],
    packable: Callable[[GpuInfo], bool],
) -> str | None:
    holder = leased_by(gpu)
    if holder:
        return f"leased by another launcher ({holder})"
    return None if packable(gpu) else gpu.busy_reason(max_used_mib)


def _too_few(pool: tuple[GpuInfo, ...], per_job: int) -> tuple[str, ...]:
    if len(pool) >= per_job:
        return ()
    return (f"--gpus-per-recipe {per_job} needs at least {per_job} GPUs; --gpus gives {len(pool)}",)
