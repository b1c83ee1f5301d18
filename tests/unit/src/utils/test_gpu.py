"""A packed job's memory cap: the launcher's reservation (RECIPE_RUNNER_GPU_BUDGET_MIB) as a fraction of its
GPU, set once on the CUDA caching allocator; nothing for a job with its GPU whole, or on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from src.contract.env import BUDGET_ENV, budget_mib
from src.utils.gpu import cap_gpu_memory, memory_cap

GIB = 2**30
H100_BYTES = 80 * GIB


def test_the_cap_is_the_reservation_as_a_fraction_of_the_gpu() -> None:
    assert memory_cap(40 * 1024, H100_BYTES) == 0.5
    assert memory_cap(20 * 1024, H100_BYTES) == 0.25


def test_no_budget_or_a_budget_as_large_as_the_gpu_means_no_cap() -> None:
    assert memory_cap(None, H100_BYTES) is None  # alone on its GPU: not packed
    assert memory_cap(80 * 1024, H100_BYTES) is None
    assert memory_cap(100 * 1024, H100_BYTES) is None


def test_the_budget_is_read_from_the_one_contract_variable() -> None:
    assert budget_mib({}) is None
    assert budget_mib({BUDGET_ENV: ""}) is None
    assert budget_mib({BUDGET_ENV: "40960"}) == 40960
    with pytest.raises(ValueError, match=BUDGET_ENV):
        budget_mib({BUDGET_ENV: "40 GiB"})
    with pytest.raises(ValueError, match="positive"):
        budget_mib({BUDGET_ENV: "0"})


@pytest.fixture
def fake_gpu(monkeypatch):
    """One 80 GiB CUDA device as torch.cuda reports it; the fractions set on it, recorded."""
    calls: list[tuple[float, int]] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=H100_BYTES)
    )
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    return calls


def test_a_packed_job_caps_its_allocator_on_its_own_gpu(monkeypatch, fake_gpu) -> None:
    monkeypatch.setenv(BUDGET_ENV, str(30 * 1024))
    assert cap_gpu_memory("cuda") == (30 * 1024, 0.375)
    assert fake_gpu == [(0.375, 1)]  # once, on the current device (a rank's own GPU)


def test_a_job_alone_on_its_gpu_or_on_the_cpu_is_not_capped(monkeypatch, fake_gpu) -> None:
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert cap_gpu_memory("cuda") is None
    monkeypatch.setenv(BUDGET_ENV, str(30 * 1024))
    assert cap_gpu_memory("cpu") is None
    assert fake_gpu == []
