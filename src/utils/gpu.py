"""GPU selection for a worker: set CUDA_VISIBLE_DEVICES before torch loads, and the device once.

`setup_gpus("0,1")` must run before `import torch` anywhere in the process: CUDA reads the
variable once, when it initialises. `resolve_device()` then names the one device the run uses, and
`cap_gpu_memory(device)` holds a packed job's caching allocator to its reservation (BUDGET_ENV) on it.

Under data parallelism (`python -m src.training.distributed`) each process is one rank of
`world_size()`: every rank sees all N GPUs in CUDA_VISIBLE_DEVICES but uses only GPU
`local_rank()`, holding a whole copy of the model. With one process and several GPUs visible,
the model is instead sharded over them (`src/models/loader.py`).
"""

from __future__ import annotations

import os
import sys

from src.contract.env import budget_mib


def setup_gpus(gpu: str | None) -> list[str]:
    """Pin this process to the given GPU ids or UUIDs; return what is visible.

    None keeps whatever CUDA_VISIBLE_DEVICES the parent set (the launcher sets it by UUID).
    """
    if gpu is not None:
        if "torch" in sys.modules:
            raise RuntimeError("setup_gpus() must run before torch is imported; move the call earlier")
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # so ids mean what nvidia-smi shows
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [part.strip() for part in visible.split(",") if part.strip()]


def rank() -> int:
    """This process's rank among the data-parallel processes (0 when it runs alone)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on this machine: the index of its GPU among the visible ones."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """How many data-parallel processes train together (1: a plain single-process run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0: the one process that writes files, prints progress and evaluates."""
    return rank() == 0


def resolve_device(cpu: bool) -> str:
    """'cuda' when a GPU is visible and not refused, else 'cpu'. Resolved once per run.

    Under data parallelism the current CUDA device becomes GPU `local_rank()`, so that every
    later "cuda" (the loader's device map, memory queries, NCCL) means this rank's own GPU.
    """
    if cpu:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if world_size() > 1:
        torch.cuda.set_device(local_rank())
    return "cuda"


def describe_device(device: str) -> dict:
    """Name and UUID of the device this process sees, for logs and status files."""
    if device != "cuda":
        return {"device": "cpu", "name": "cpu", "uuid": None, "count": 0, "world_size": world_size()}
    import torch

    index = torch.cuda.current_device()  # this rank's GPU under data parallelism, else 0
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    return {
        "device": f"cuda:{index}",
        "name": props.name,
        "uuid": f"GPU-{uuid}" if uuid is not None else None,
        "count": torch.cuda.device_count(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "world_size": world_size(),
    }


def memory_cap(budget: int | None, total_bytes: int) -> float | None:
    """The fraction of a GPU of `total_bytes` that a job held to `budget` MiB may fill; None: no cap (no
    budget, i.e. the job has its GPU whole, or a budget as large as the GPU). Pure."""
    if budget is None or total_bytes <= 0:
        return None
    fraction = budget * 2**20 / total_bytes
    return fraction if fraction < 1.0 else None


def cap_gpu_memory(device: str) -> tuple[int, float] | None:
    """Hold this process's CUDA caching allocator to the launcher's reservation for it (BUDGET_ENV, set only
    for a packed job), on its one GPU; once, right after the device is resolved. Returns (budget MiB, the
    fraction of the GPU) when capped, None when not (CPU, or a job with its GPU whole).

    Past the cap an allocation raises torch.cuda.OutOfMemoryError (exit 3) instead of taking a neighbour's
    memory; the launcher then runs the job again alone on a GPU, uncapped (recipe_runner/backends/loop.py).
    """
    budget = budget_mib(os.environ)
    if device != "cuda" or budget is None:
        return None
    import torch

    index = torch.cuda.current_device()  # this rank's own GPU under data parallelism (resolve_device)
    fraction = memory_cap(budget, torch.cuda.get_device_properties(index).total_memory)
    if fraction is None:
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return budget, fraction


def available_gpu_bytes() -> int:
    """GPU memory this process may fill: what is free plus what its own allocator already holds, and no
    more than the launcher's reservation for it (BUDGET_ENV) when it shares the GPU."""
    import torch

    free, _total = torch.cuda.mem_get_info()
    usable = free + torch.cuda.memory_reserved()
    budget = budget_mib(os.environ)
    return min(usable, budget * 2**20) if budget else usable


def unallocated_gpu_bytes() -> int:
    """What this process may still allocate: available_gpu_bytes less what its tensors hold now."""
    import torch

    return max(0, available_gpu_bytes() - torch.cuda.memory_allocated())
