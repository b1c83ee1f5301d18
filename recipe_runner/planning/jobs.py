"""Pure planning: recipes + GPUs + options -> one `JobSpec` per recipe (argv, env, paths).

Nothing here touches a process, a file or NVML; the executor (`execute.py`) runs the specs and
the CLI prints them for `plan` / `--dry-run`. GPU jobs are planned without a device and bound to
GPUs (`bind_gpus`) only when they start, because with more recipes than GPUs the queue decides
at run time which GPU frees first.

Testing hook: env `RECIPE_RUNNER_WORKER` (a JSON list, e.g. `["python", "tests/fakes/worker.py"]`)
replaces the worker command `[sys.executable, "-m", "src.training.worker"]`.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from recipe_runner.host.gpus import GpuInfo
from recipe_runner.planning.request import SweepPoint
from src.contract.env import BASE_ENV, BUDGET_ENV
from src.contract.flags import TrainFlags, flag_name, flag_text, flag_value, worker_default

WORKER_ENV = "RECIPE_RUNNER_WORKER"
BASELINE_DIR = "base"  # <launch>/base: the untrained model's metrics on the test split


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


def build_jobs(
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
        point_flags = flags.replace(
            seed=flags.seed if point.seed is None else point.seed,
            dataset=flags.dataset if point.dataset is None else point.dataset,
        )
        for key in recipes:
            job = _job(key, point.tag, launch_dir, point_flags, worker, cpu_threads, gpu_job_threads)
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
        out[first] = replace(
            out[first], argv=with_flag(out[first].argv, flag_name("baseline_dir"), str(target))
        )
    return out


def _job(
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
    argv = [*worker, "--recipe", key, flag_name("output_dir"), str(output_dir), *flags.argv()]
    env = dict(BASE_ENV)
    if cpu_threads is not None:
        argv += [flag_name("cpu"), flag_name("threads"), str(cpu_threads)]
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
        job,
        argv=with_flag(job.argv, flag_name("threads"), str(threads)),
        env={**job.env, **thread_env(threads)},
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
        argv = with_flag(argv, f"--lora-{key}", flag_text(value))
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


def with_flag(argv: Sequence[str], flag: str, value: str | None = None) -> tuple[str, ...]:
    """argv with `flag` (and its value) set once: replaced where present, else appended."""
    rest = without_flag(argv, flag, takes_value=value is not None)
    return (*rest, flag, *([] if value is None else [value]))


def without_flag(argv: Sequence[str], flag: str, takes_value: bool = True) -> tuple[str, ...]:
    """argv without `flag` (and the value after it, when it takes one)."""
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == flag:
            skip = takes_value
        else:
            out.append(word)
    return tuple(out)


def resume_spec(result) -> JobSpec:
    """The job of an earlier launch's summary entry, continuing from its last checkpoint.

    A worker that never wrote status.json had nothing to resume: it starts afresh.
    """
    # Its GPUs whole again (a resume does not pack), so not held to a reservation either.
    dropped = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", BUDGET_ENV)
    env = {k: v for k, v in result.env.items() if k not in dropped}
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
    argv = with_flag(with_flag(job.argv, flag_name("cpu")), flag_name("threads"), str(threads))
    return replace(job, argv=argv, env={**job.env, **cpu_env(threads)}, threads=threads, gpus=())


def alone(job: JobSpec) -> JobSpec:
    """The job on GPUs of its own: it reserves them whole, so it is no longer held to a packed reservation
    (no BUDGET_ENV: its worker does not cap its memory)."""
    env = {k: v for k, v in job.env.items() if k != BUDGET_ENV}
    return replace(job, reserve_mib=None, env=env)


def resumed(job: JobSpec) -> JobSpec:
    """The same job continuing in its output directory from its last checkpoint."""
    return replace(job, argv=with_flag(job.argv, flag_name("resume")))


def oom_retry(job: JobSpec) -> JobSpec | None:
    """After CUDA OOM: half the micro-batch, twice the accumulation (the same effective batch),
    resuming from the last checkpoint. None when the micro-batch is already 1."""
    batch = int(flag_value(job.argv, flag_name("batch_size")) or worker_default("batch_size"))
    accum = int(flag_value(job.argv, flag_name("grad_accum")) or worker_default("grad_accum"))
    if batch <= 1:
        return None
    argv = with_flag(job.argv, flag_name("batch_size"), str(batch // 2))
    argv = with_flag(argv, flag_name("grad_accum"), str(accum * 2 if batch % 2 == 0 else accum * batch))
    if batch % 2:  # an odd batch cannot halve exactly: go to 1 x (batch * accum)
        argv = with_flag(argv, flag_name("batch_size"), "1")
    return resumed(replace(job, argv=argv))
