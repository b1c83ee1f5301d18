"""The launch's GPUs and the reservations on them: where the local backend places each job.

A job reserves its planned memory on each GPU it gets (`spec.reserve_mib`), or the GPUs whole (None), by
`placement.choose_gpus`, the rule `recipe-run plan` shows. Reservations are files every launcher on the
host reads (host/leases.py), so two launchers pack onto one GPU only while their planned peaks fit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from recipe_runner.host.gpus import DEFAULT_MAX_USED_MIB, GpuInfo
from recipe_runner.host.leases import WHOLE_GPU, Lease, reservations, reserve
from recipe_runner.planning.jobs import JobSpec
from recipe_runner.planning.placement import GpuRoom, choose_gpus

PROBE_EVERY_S = 1.0  # NVML is asked again at most this often while jobs wait for a GPU


class GpuPool:
    """The launch's GPUs, each job's reservations on them, and what each GPU can still take."""

    def __init__(
        self,
        gpus: Sequence[GpuInfo],
        probe: Callable[[], list[GpuInfo]],
        lease_dir: Path,
        launch_id: str,
        max_jobs_per_gpu: int = 1,
        max_used_mib: int = DEFAULT_MAX_USED_MIB,
        cores: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.gpus, self.probe, self.lease_dir = list(gpus), probe, lease_dir
        self.cores = dict(cores or {})  # GPU uuid -> the cores its jobs are pinned to (--pin-cpus)
        self.launch_id, self.max_jobs, self.max_used_mib = launch_id, max_jobs_per_gpu, max_used_mib
        self.waiting_for = ""  # why the last take() found nothing, for the user
        self._seen = {gpu.uuid: gpu for gpu in gpus}
        self._seen_at = time.monotonic()
        # What reservations may fill: the memory that was not in use (by others) when the launch began.
        self.capacity = {gpu.uuid: _capacity_mib(gpu, reservations(lease_dir, gpu.uuid)) for gpu in gpus}

    def take(self, spec: JobSpec) -> tuple[list[GpuInfo], list[Lease], bool] | None:
        """GPUs and reservations for `spec`, and whether it shares a GPU; None when it must wait."""
        rooms = self.rooms()
        chosen = choose_gpus(rooms, spec.gpu_count, spec.reserve_mib, self.max_jobs)
        if chosen is None:
            self.waiting_for = "; ".join(f"{r.gpu.label} {r.blocked}" for r in rooms if r.blocked)
            return None
        note = f"recipe {spec.key} launch {self.launch_id}"
        leases: list[Lease] = []
        for gpu in chosen:
            mib = WHOLE_GPU if spec.reserve_mib is None else spec.reserve_mib
            lease = reserve(self.lease_dir, gpu.uuid, note, mib, self.capacity[gpu.uuid])
            if lease is None:  # another launcher got there between our look and our reservation
                for held in leases:
                    held.release()
                self.waiting_for = f"{gpu.label} was just reserved by another launcher"
                return None
            leases.append(lease)
        self.waiting_for = ""
        shared = any(room.jobs for room in rooms if room.gpu in chosen)
        return chosen, leases, shared

    def rooms(self) -> list[GpuRoom]:
        """What each GPU of the pool can take now (`plan` places its first wave on these)."""
        return [self._room(gpu) for gpu in self.gpus]

    def _room(self, gpu: GpuInfo) -> GpuRoom:
        live = reservations(self.lease_dir, gpu.uuid)
        reserved = sum(r.mib for r in live if not r.exclusive)
        blocked = next((f"held whole ({r.note})" for r in live if r.exclusive), None)
        if not live:  # nothing planned is on it: a process there is someone else's
            busy = self._current(gpu).busy_reason(self.max_used_mib)
            blocked = f"busy: {busy}" if busy else None
        elif self.max_jobs == 1:
            blocked = blocked or f"in use ({'; '.join(r.note for r in live)})"
        return GpuRoom(gpu, self.capacity[gpu.uuid], reserved, len(live), blocked)

    def _current(self, gpu: GpuInfo) -> GpuInfo:
        # Someone else may have started on a GPU since the launch began: look again, but
        # not on every loop turn.
        if time.monotonic() - self._seen_at >= PROBE_EVERY_S:
            with contextlib.suppress(Exception):  # a failed probe keeps the last answer
                self._seen = {g.uuid: g for g in self.probe()}
            self._seen_at = time.monotonic()
        return self._seen.get(gpu.uuid, gpu)


def _capacity_mib(gpu: GpuInfo, live: Sequence) -> int:
    # With reservations live, what is in use there is theirs (already counted): only an idle GPU's
    # used memory belongs to someone we cannot see.
    return gpu.memory_total_mib - (0 if live else gpu.memory_used_mib)
