"""Placement: which jobs share a GPU, which span several, and in what order they start. Pure code.

`make_plan(request, launch id, worker, rooms, memory plans, cores) -> Plan` is the whole decision: the
launcher builds a `LaunchRequest` once from argv, asks NVML for the GPUs' rooms and the memory planner
for each recipe's estimate (recipe_runner/planning/estimates.py), and gets back every job with its
command, environment, GPU count, memory reservation, predicted time and first placement. `recipe-run
plan` prints it; `recipe-run launch` hands its jobs to a backend and the run loop.

One rule places jobs, in the plan (its first wave) and in the executor (each time a GPU frees up): a job
goes to the emptiest GPUs that have room for its memory reservation, the longest predicted job first.

  * A job's reservation is the memory planner's predicted peak plus a margin and a CUDA context
    (`reservation_mib`). Without a plan (a hub model not cached here, Ray, a sharded model) or with
    `--pack off`, a job reserves its GPUs whole, as before packing existed.
  * A GPU takes jobs while their reservations fit its capacity (its memory less what others used when the
    launch began) and it holds fewer than `--max-jobs-per-gpu` of them. Reservations of other launchers on
    the host count too (recipe_runner/host/leases.py keeps them).
  * A GPU with no reservation but a foreign process on it (NVML) is busy, as before: nobody planned that
    process, so nothing is packed beside it.

    from recipe_runner.planning.placement import GpuRoom, choose_gpus
    choose_gpus([GpuRoom(gpu, capacity_mib=143_000)], count=1, mib=45_000, max_jobs=4)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from recipe_runner.host.gpus import GpuInfo
from recipe_runner.planning.estimates import MemoryEstimate, rank_batch
from recipe_runner.planning.jobs import (
    JobSpec,
    as_data_parallel,
    build_jobs,
    split_threads,
    with_flag,
    with_gpu_threads,
)
from recipe_runner.planning.request import LaunchRequest
from src.contract.env import BUDGET_ENV
from src.contract.flags import flag_name, flag_value

# The planner predicts torch's peak allocation; the process holds more: the CUDA context with cuBLAS and
# NCCL handles (about 0.6 GiB on an H200 with torch 2.11) and the caching allocator's unused blocks, which
# expandable segments (set for every GPU child, plan.py) keep small.
CUDA_CONTEXT_MIB = 1024
# Of the predicted peak: fragmentation (small with expandable segments) and the planner's error, which was
# -0.3% to +5.4% of the measured peak (docs/benchmarks.md). A job that still runs out is retried alone.
PACK_MARGIN = 0.05


@dataclass(frozen=True)
class GpuRoom:
    """What one GPU can still take, as placement sees it."""

    gpu: GpuInfo
    capacity_mib: int  # what reservations may fill in all
    reserved_mib: int = 0  # live reservations, ours and other launchers'
    jobs: int = 0  # how many live reservations
    blocked: str | None = None  # why nothing may start here (held whole, a foreign process)

    @property
    def idle(self) -> bool:
        """Nothing runs or is reserved here: a spare GPU when GPUs outnumber jobs."""
        return not self.blocked and self.jobs == 0

    def fits(self, mib: int | None, max_jobs: int) -> bool:
        if self.blocked:
            return False
        if mib is None:  # a whole GPU: an empty one
            return self.jobs == 0
        return self.jobs < max_jobs and self.reserved_mib + mib <= self.capacity_mib

    def with_job(self, mib: int | None) -> GpuRoom:
        if mib is None:
            return replace(self, jobs=self.jobs + 1, blocked="held whole by a job of this launch")
        return replace(self, jobs=self.jobs + 1, reserved_mib=self.reserved_mib + mib)


def choose_gpus(rooms: Sequence[GpuRoom], count: int, mib: int | None, max_jobs: int) -> list[GpuInfo] | None:
    """`count` GPUs with room for `mib` each (None: whole, empty GPUs), the emptiest first; None if too few.

    Emptiest first spreads jobs over idle GPUs before any two share one.
    """
    open_rooms = sorted(
        (room for room in rooms if room.fits(mib, max_jobs)),
        key=lambda room: (room.jobs, room.reserved_mib, room.gpu.index),
    )
    if len(open_rooms) < count:
        return None
    return [room.gpu for room in open_rooms[:count]]


def reservation_mib(predicted_gib: float) -> int:
    """The MiB a job with this predicted peak reserves on its GPU (each GPU, for a data-parallel job)."""
    return math.ceil(predicted_gib * 1024 * (1 + PACK_MARGIN)) + CUDA_CONTEXT_MIB


def start_order(priorities: Sequence[float]) -> list[int]:
    """Indices of jobs in the order they should start: the longest predicted first, ties in plan order.

    The longest job bounds the makespan, so it must not wait behind short ones (r3 runs two stages).
    """
    return sorted(range(len(priorities)), key=lambda index: (-priorities[index], index))


def first_wave(
    needs: Sequence[tuple[int, int | None]],
    priorities: Sequence[float],
    rooms: Sequence[GpuRoom],
    max_jobs: int,
) -> list[list[GpuInfo] | None]:
    """Where each job (GPU count, MiB each) starts if all are asked at once; None for a queued job.

    The executor applies the same rule as GPUs free up, so this is what `plan` shows.
    """
    rooms = list(rooms)
    placed: list[list[GpuInfo] | None] = [None] * len(needs)
    for index in start_order(priorities):
        count, mib = needs[index]
        chosen = choose_gpus(rooms, count, mib, max_jobs)
        if chosen is None:
            continue
        placed[index] = chosen
        uuids = {gpu.uuid for gpu in chosen}
        rooms = [room.with_job(mib) if room.gpu.uuid in uuids else room for room in rooms]
    return placed


def sharing(placed: Sequence[Sequence[GpuInfo] | None]) -> dict[str, int]:
    """GPU uuid -> how many of the placed jobs start on it."""
    counts: dict[str, int] = {}
    for gpus in placed:
        for gpu in gpus or []:
            counts[gpu.uuid] = counts.get(gpu.uuid, 0) + 1
    return counts


# --- the launch as one pure step: request + GPUs + memory plans -> Plan ----------------------------------

# A GPU worker's intra-op threads only run the CPU side of each step; more than a few compete with the
# Python thread launching kernels (docs/benchmarks.md, four recipes on four GPUs).
MAX_GPU_WORKER_THREADS = 4
DATA_PARALLEL_STARTUP_S = 30.0


@dataclass(frozen=True)
class Plan:
    """Everything a launch will do, decided before anything starts: `plan` prints it, `launch` runs it."""

    launch_id: str
    launch_dir: Path
    jobs: tuple[JobSpec, ...]
    first_wave: tuple[tuple[GpuInfo, ...] | None, ...] = ()  # where each job starts; None: it queues
    memory: Mapping[str, MemoryEstimate] = field(default_factory=dict)  # recipe -> one rank's plan
    on_gpus: bool = False
    # seconds from the first start to the last end (planning/makespan.py), and with every recipe at its
    # fastest setting; None where not predicted
    makespan_s: float | None = None
    fastest_makespan_s: float | None = None

    def reason(self, job: JobSpec) -> str:
        """Why the job is placed as it is, in one line."""
        ranks = flag_value(job.argv, "--nproc-per-node")
        how = f"{ranks} data-parallel processes, " if ranks else ""
        how += f"one model sharded over {job.gpu_count} GPUs, " if job.gpu_count > 1 and not ranks else ""
        if job.reserve_mib is None:
            how += "its GPUs whole (no memory plan, --pack off, or sharded)"
        else:
            share = f"{job.reserve_mib / 1024:.1f} GiB a GPU"
            peak = "planned peak, training's or evaluation's"
            how += f"reserves {share} ({peak}, + {PACK_MARGIN:.0%} + CUDA context)"
        if job.predicted_s:
            how += f"; about {job.predicted_s:.0f} s of training predicted (the longest starts first)"
        return how


def make_plan(
    request: LaunchRequest,
    launch_id: str,
    worker: Sequence[str],
    rooms: Sequence[GpuRoom] | None,
    memory: Mapping[str, MemoryEstimate],
    cores: int,
) -> Plan:
    """The launch's jobs, where each starts, and why. `rooms` is None off local GPUs (--cpu, Ray)."""
    launch_dir = request.output_dir.resolve() / launch_id
    flags = request.flags
    if rooms is None:
        # On Ray a cluster has no one core count: --threads is per recipe there.
        threads = (
            (request.threads or 1)
            if request.backend == "ray"
            else split_threads(request.threads or cores, request.jobs)
        )
        cpu_threads = threads if request.cpu else None
        jobs = build_jobs(
            request.recipes, launch_dir, flags, worker, cpu_threads, sweep=request.sweep, lora=request.lora
        )
        if request.backend == "ray" and not request.cpu and request.gpus_per_recipe > 1:
            # One Ray actor holds the N GPUs on one node; the job runs there as N data-parallel ranks.
            jobs = [place_job(job, None, request, worker, request.gpus_per_recipe) for job in jobs]
        return Plan(launch_id, launch_dir, tuple(jobs), memory=memory)
    jobs = build_jobs(request.recipes, launch_dir, flags, worker, sweep=request.sweep, lora=request.lora)
    ranks = [request.gpus_per_recipe] * len(jobs)
    if request.spread:
        ranks = spread_spare_gpus(jobs, memory, sum(room.idle for room in rooms))
    jobs = [
        place_job(job, memory.get(job.recipe), request, worker, n) for job, n in zip(jobs, ranks, strict=True)
    ]
    wave = first_wave(
        [(j.gpu_count, j.reserve_mib) for j in jobs], [j.predicted_s for j in jobs], rooms, request.max_jobs
    )
    at_once = max(1, sum(gpus is not None for gpus in wave))
    threads = min(MAX_GPU_WORKER_THREADS, split_threads(request.threads or cores, at_once))
    jobs = [with_gpu_threads(job, threads) for job in jobs]
    placed = tuple(tuple(gpus) if gpus else None for gpus in wave)
    return Plan(launch_id, launch_dir, tuple(jobs), placed, memory, on_gpus=True)


def core_slices(
    gpus: Sequence[GpuInfo], usable: Sequence[int], core_of: Mapping[int, int] | None = None
) -> dict[str, tuple[int, ...]]:
    """GPU uuid -> the CPU cores its jobs run on (`--pin-cpus auto`).

    The usable cores are split evenly and without overlap over every GPU of the host, whole physical
    cores at a time (`core_of`: logical cpu -> its physical core; hyperthread siblings stay together),
    each GPU's share taken from its own NUMA node first (`GpuInfo.near_cpus`). Over all the host's GPUs,
    not only the launch's, so two launchers on one host give a GPU the same cores, and jobs on different
    GPUs never share a core: the host-bound Python thread of one recipe's step is not slowed by another's.
    Empty (nothing pinned) when the host has fewer physical cores than GPUs.
    """
    core_of = core_of or {}
    threads_of: dict[int, list[int]] = {}
    for cpu in sorted(set(usable)):
        threads_of.setdefault(core_of.get(cpu, cpu), []).append(cpu)
    if not gpus or len(threads_of) < len(gpus):
        return {}
    share = len(threads_of) // len(gpus)
    left = list(threads_of)
    slices = {}
    for gpu in sorted(gpus, key=lambda g: g.index):
        near = set(gpu.near_cpus)
        # sorted() is stable: the near cores first, each group in core order
        picked = sorted(left, key=lambda core: near.isdisjoint(threads_of[core]))[:share]
        slices[gpu.uuid] = tuple(sorted(cpu for core in picked for cpu in threads_of[core]))
        left = [core for core in left if core not in picked]
    return slices


def spread_spare_gpus(
    jobs: Sequence[JobSpec], memory: Mapping[str, MemoryEstimate], idle_gpus: int
) -> list[int]:
    """Data-parallel ranks per job when idle GPUs outnumber the jobs: each spare GPU goes to the job with
    the longest predicted time per rank, as long as its samples a step still split evenly.

    Only jobs with a memory plan that fits one GPU are spread: data parallel needs the model on each.
    """
    ranks = [1] * len(jobs)
    spare = idle_gpus - len(jobs)
    while spare > 0:
        candidates = [
            index
            for index, job in enumerate(jobs)
            if (plan := memory.get(job.recipe)) is not None
            and plan.fits
            and plan.train_s > 0
            and (plan.batch_size * plan.grad_accum) % (ranks[index] + 1) == 0
        ]
        if not candidates:
            break
        longest = max(candidates, key=lambda i: _rank_time(memory[jobs[i].recipe], ranks[i]))
        plan, now = memory[jobs[longest].recipe], ranks[longest]
        if _rank_time(plan, now + 1) >= _rank_time(plan, now):
            break  # the extra processes' start-up would cost more than they save
        ranks[longest] += 1
        spare -= 1
    return ranks


def _rank_time(plan: MemoryEstimate, ranks: int) -> float:
    return plan.train_s / ranks + _startup_s(ranks)


def place_job(
    job: JobSpec, plan: MemoryEstimate | None, request: LaunchRequest, worker: Sequence[str], ranks: int
) -> JobSpec:
    """One job as placement needs it: its batch flags, its GPUs (`ranks` data-parallel processes, or one
    model sharded over them), its memory reservation (packing) and its predicted time (longest first).

    `plan` is one rank's plan for `request.gpus_per_recipe` ranks; a job given spare GPUs (`ranks` above
    that) splits the plan's samples a step further.
    """
    sharded = ranks > 1 and (request.shard or (plan is not None and not plan.fits))
    if sharded:  # accelerate spreads one model over the GPUs; the batch is the one-GPU batch
        return replace(job, gpu_count=ranks, predicted_s=plan.train_s if plan else 0.0)
    argv = job.argv
    split = ranks // request.gpus_per_recipe
    if plan is not None:  # the worker runs what was planned, so that its reservation holds
        planned = request.flags.replace(batch_size=plan.batch_size, grad_accum=plan.grad_accum)
        batch, accum = rank_batch(planned, split)
        if request.flags.batch_size == "auto" or ranks > 1:
            argv = with_flag(
                with_flag(argv, flag_name("batch_size"), str(batch)), flag_name("grad_accum"), str(accum)
            )
        argv = with_flag(argv, flag_name("gradient_checkpointing"), "on" if plan.checkpointing else "off")
        if request.recipe(job.recipe).quantized:  # a 4-bit recipe (a chain: one of its stages): copies or not
            argv = with_flag(argv, flag_name("dequantize_once"), "on" if plan.dequantized else "off")
    elif ranks > 1:
        batch, accum = rank_batch(request.flags, ranks)
        argv = with_flag(
            with_flag(argv, flag_name("batch_size"), str(batch)), flag_name("grad_accum"), str(accum)
        )
    job = replace(job, argv=argv)
    if ranks > 1:
        job = as_data_parallel(job, ranks, worker)
    if plan is None:
        return replace(job, predicted_s=0.0)
    if not (plan.fits and request.pack == "auto"):
        return replace(job, predicted_s=plan.train_s / split + _startup_s(ranks))
    reserve = reservation_mib(plan.reserved_gib)
    return replace(
        job,
        env={**job.env, BUDGET_ENV: str(reserve - CUDA_CONTEXT_MIB)},  # the worker stays inside it
        reserve_mib=reserve,
        predicted_s=plan.train_s / split + _startup_s(ranks),
    )


def _startup_s(ranks: int) -> float:
    # Data-parallel ranks each load the model and join a process group: measured about 27 s more than
    # one process for 7B r4 on 2x H200 (docs/benchmarks.md), paid once per job.
    return DATA_PARALLEL_STARTUP_S if ranks > 1 else 0.0
