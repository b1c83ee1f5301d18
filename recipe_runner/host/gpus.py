"""What GPUs this host has and which are free, from NVML (no torch, no CUDA context).

`probe_gpus()` returns one `GpuInfo` per device in NVML order (the index `nvidia-smi` shows).
A GPU is free when no compute process runs on it and less than `max_used_mib` of its memory
is in use; the memory rule catches processes NVML cannot name (other containers, MIG).

Testing hook: env `RECIPE_RUNNER_FAKE_GPUS` replaces NVML with fake records, so the launcher
can be exercised on a machine without GPUs. Its value is one of
  * a count, e.g. `2`: that many idle 80 GiB GPUs;
  * a JSON list of records, e.g. `[{"memory_used_mib": 9000, "processes": [123]}, {}]`
    (fields as `GpuInfo`; missing ones get idle defaults, `index` and `uuid` from the position);
  * `@/path/to/file.json` holding such a list, re-read on every probe (so a test can free a GPU);
  * `none`: behave as if there were no NVIDIA driver.

Print the table with `python -m recipe_runner gpus`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAKE_GPUS_ENV = "RECIPE_RUNNER_FAKE_GPUS"
DEFAULT_MAX_USED_MIB = 2048
MIB = 1024 * 1024
CPU_MASK_WORDS = 64  # words of NVML's CPU affinity mask asked for: 4,096 cores


class NvmlUnavailable(RuntimeError):
    """No NVIDIA driver or NVML library here: GPUs cannot be listed, so none can be used."""


@dataclass(frozen=True)
class GpuInfo:
    """One device as NVML reports it at probe time."""

    index: int
    uuid: str  # "GPU-<uuid>": what children get in CUDA_VISIBLE_DEVICES
    name: str = "NVIDIA GPU"
    memory_used_mib: int = 0
    memory_total_mib: int = 81559
    utilization_pct: int | None = None
    processes: tuple[int, ...] = field(default=())  # pids of compute processes
    near_cpus: tuple[int, ...] = field(default=())  # the cores NVML names as closest (its NUMA node)

    @property
    def label(self) -> str:
        return f"gpu{self.index}"

    def busy_reason(self, max_used_mib: int = DEFAULT_MAX_USED_MIB) -> str | None:
        """Why this GPU is not free, or None when it is."""
        if self.processes:
            pids = ", ".join(str(pid) for pid in self.processes[:4])
            more = " ..." if len(self.processes) > 4 else ""
            return f"{len(self.processes)} compute process(es) running (pid {pids}{more})"
        if self.memory_used_mib >= max_used_mib:
            return f"{self.memory_used_mib} MiB in use (limit --max-used-mib {max_used_mib})"
        return None

    def is_free(self, max_used_mib: int = DEFAULT_MAX_USED_MIB) -> bool:
        return self.busy_reason(max_used_mib) is None


def probe_gpus(environ: Mapping[str, str] | None = None) -> list[GpuInfo]:
    """Every GPU on this host; raises NvmlUnavailable without a driver."""
    environ = os.environ if environ is None else environ
    fake = environ.get(FAKE_GPUS_ENV)
    if fake is not None:
        return parse_fake_gpus(fake)
    return probe_nvml()


def parse_fake_gpus(text: str) -> list[GpuInfo]:
    """GPU records from the testing hook's value (see the module docstring)."""
    text = text.strip()
    if text.lower() == "none":
        raise NvmlUnavailable(f"no NVML ({FAKE_GPUS_ENV}=none)")
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    data: Any = json.loads(text)
    if isinstance(data, int):
        data = [{} for _ in range(data)]
    if not isinstance(data, list):
        raise ValueError(f"{FAKE_GPUS_ENV} must be a count or a JSON list of GPU records")
    return [_fake_record(position, record) for position, record in enumerate(data)]


def _fake_record(position: int, record: dict[str, Any]) -> GpuInfo:
    fields = {"index": position, "uuid": f"GPU-fake-{position:04d}", "name": "Fake GPU", **record}
    fields["processes"] = tuple(fields.get("processes", ()))
    fields["near_cpus"] = tuple(fields.get("near_cpus", ()))
    return GpuInfo(**fields)


def probe_nvml(nvml: Any = None) -> list[GpuInfo]:
    """Ask NVML directly; `nvml` is the pynvml module, injectable for tests."""
    if nvml is None:
        try:
            import pynvml  # imported here: only a real probe needs it
        except ImportError as error:
            raise NvmlUnavailable("the nvidia-ml-py package (pynvml) is not installed") from error
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        raise NvmlUnavailable(f"NVML could not start: {error}") from error
    try:
        return [_read_device(nvml, index) for index in range(nvml.nvmlDeviceGetCount())]
    finally:
        nvml.nvmlShutdown()


def _read_device(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_used_mib=int(memory.used // MIB),
        memory_total_mib=int(memory.total // MIB),
        utilization_pct=_optional(nvml, lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
        processes=_optional(nvml, lambda: _compute_pids(nvml, handle)) or (),
        near_cpus=_optional(nvml, lambda: _near_cpus(nvml, handle)) or (),
    )


def _compute_pids(nvml: Any, handle: Any) -> tuple[int, ...]:
    return tuple(int(proc.pid) for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle))


def probe_cores(sys_cpu: Path = Path("/sys/devices/system/cpu")) -> tuple[list[int], dict[int, int]]:
    """The cores this process may run on, and each one's physical core (its lowest hyperthread sibling).

    Linux only (sched_getaffinity and sysfs); elsewhere no cores, so nothing is pinned.
    """
    if not hasattr(os, "sched_getaffinity"):
        return [], {}
    usable = sorted(os.sched_getaffinity(0))
    core_of = {}
    for cpu in usable:
        siblings = sys_cpu / f"cpu{cpu}" / "topology" / "thread_siblings_list"
        try:
            core_of[cpu] = min(_cpu_list(siblings.read_text()))
        except (OSError, ValueError):
            core_of[cpu] = cpu
    return usable, core_of


def _cpu_list(text: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8] (the kernel's cpu list format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def cpu_list_text(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8', the kernel's format (taskset -c takes it)."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{low}-{high}" if high > low else str(low) for low, high in runs)


def _near_cpus(nvml: Any, handle: Any) -> tuple[int, ...]:
    """The cores of the GPU's NUMA node: NVML's affinity mask, 64 cores per word, lowest word first."""
    words = nvml.nvmlDeviceGetCpuAffinity(handle, CPU_MASK_WORDS)
    return tuple(64 * w + bit for w, word in enumerate(words) for bit in range(64) if int(word) >> bit & 1)


def _optional(nvml: Any, read: Any) -> Any:
    # Some queries are unsupported on some boards or MIG slices; the memory rule still applies.
    try:
        return read()
    except nvml.NVMLError:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
