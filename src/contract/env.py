"""Environment variables the launcher, the worker and its ranks set for one another.

Torch-free; the one place their names are written (the launcher's own testing hooks live beside the code
that reads them: RECIPE_RUNNER_FAKE_GPUS, RECIPE_RUNNER_WORKER, RECIPE_RUNNER_LEASE_DIR).
"""

from __future__ import annotations

from collections.abc import Mapping

# Set by the launcher for a packed job only (one that holds a reservation on its GPU, not the GPU whole): the
# GPU memory (MiB) it may use, its reservation less the CUDA context. The worker caps its CUDA caching
# allocator there (src/utils/gpu.py, cap_gpu_memory), so an OOM under it is the job's own, and its
# evaluation batches keep inside. Absent: the job has its GPUs whole and nothing caps it.
BUDGET_ENV = "RECIPE_RUNNER_GPU_BUDGET_MIB"
# Set by src.training.distributed for its ranks: the flags were checked and --gpu applied once, there.
FLAGS_CHECKED_ENV = "RECIPE_RUNNER_FLAGS_CHECKED"
# Seconds a data-parallel collective may wait (default 300).
DDP_TIMEOUT_ENV = "RECIPE_RUNNER_DDP_TIMEOUT"
# Testing hooks of the reliability tests: "STAGE:STEP" raises after that step, "STAGE:STEP:kill" SIGKILLs
# the worker there, "STAGE:STEP:oom" raises CUDA's out-of-memory error; FAULT_RANK_ENV=N limits it to rank N.
FAULT_ENV = "RECIPE_RUNNER_FAULT_AT"
FAULT_RANK_ENV = "RECIPE_RUNNER_FAULT_RANK"
# The multi-GPU machines need NVLink multicast off in every process (docs/stack.md says why).
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# Every worker gets these: whole lines as they are printed, and no NVLink multicast.
BASE_ENV = {"PYTHONUNBUFFERED": "1", **NO_MULTICAST_ENV}


def budget_mib(env: Mapping[str, str]) -> int | None:
    """The GPU memory (MiB) a packed job is held to, from its environment; None for a job with its GPUs whole.

    Both sides read it here: the worker to cap itself, the launcher to know that an OOM was the job's own.
    """
    text = env.get(BUDGET_ENV)
    if not text:
        return None
    try:
        mib = int(text)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={text!r}: expected a whole number of MiB") from None
    if mib <= 0:
        raise ValueError(f"{BUDGET_ENV}={text!r}: expected a positive number of MiB")
    return mib
