"""Which of this host's GPUs a launch may use, or why it cannot start (`select_gpus`, pure over NVML's records
and the other launchers' reservations).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from recipe_runner.host.gpus import GpuInfo


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
