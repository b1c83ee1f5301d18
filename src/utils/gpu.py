"""GPU selection for a worker: set CUDA_VISIBLE_DEVICES before torch loads, and the device once.

`setup_gpus("0,1")` must run before `import torch` anywhere in the process: CUDA reads the
variable once, when it initialises. `resolve_device()` then names the one device the run uses.
"""

from __future__ import annotations

import os
import sys


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


def resolve_device(cpu: bool) -> str:
    """'cuda' when a GPU is visible and not refused, else 'cpu'. Resolved once per run."""
    if cpu:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_device(device: str) -> dict:
    """Name and UUID of the device this process sees, for logs and status files."""
    if device != "cuda":
        return {"device": "cpu", "name": "cpu", "uuid": None, "count": 0}
    import torch

    props = torch.cuda.get_device_properties(0)
    uuid = getattr(props, "uuid", None)
    return {
        "device": "cuda:0",
        "name": props.name,
        "uuid": f"GPU-{uuid}" if uuid is not None else None,
        "count": torch.cuda.device_count(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
