"""CPU pinning (`--pin-cpus auto`): each GPU's jobs run on their own share of the host's cores, nearest the
GPU first, so recipes on different GPUs never compete for a core."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from recipe_runner.backends.local import spawn
from recipe_runner.cli.main import main
from recipe_runner.host.gpus import GpuInfo, _near_cpus, cpu_list_text, probe_cores
from recipe_runner.planning.placement import core_slices

USABLE = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two_cores = pytest.mark.skipif(len(USABLE) < 2, reason="pinning needs Linux and two usable cores")


def gpu(index: int, near: range | tuple = ()) -> GpuInfo:
    return GpuInfo(index, f"GPU-{index}", near_cpus=tuple(near))


# A two-socket host: 16 physical cores, cpu c and c + 16 are hyperthreads of one core; socket 0 holds
# physical cores 0-7, socket 1 holds 8-15.
SIBLING = {cpu: cpu % 16 for cpu in range(32)}
SOCKET_0 = (*range(0, 8), *range(16, 24))
SOCKET_1 = (*range(8, 16), *range(24, 32))


def test_each_gpu_gets_its_own_sockets_cores_with_their_hyperthreads() -> None:
    slices = core_slices([gpu(0, SOCKET_0), gpu(1, SOCKET_1)], range(32), SIBLING)
    assert slices == {"GPU-0": tuple(sorted(SOCKET_0)), "GPU-1": tuple(sorted(SOCKET_1))}


def test_two_gpus_a_socket_split_it_without_sharing_a_physical_core() -> None:
    gpus = [gpu(0, SOCKET_0), gpu(1, SOCKET_0), gpu(2, SOCKET_1), gpu(3, SOCKET_1)]
    slices = core_slices(gpus, range(32), SIBLING)
    physical = {uuid: {SIBLING[cpu] for cpu in cpus} for uuid, cpus in slices.items()}
    assert all(len(cores) == 4 for cores in physical.values())
    assert set().union(*physical.values()) == set(range(16))  # every core used, none twice
    assert physical["GPU-0"] | physical["GPU-1"] == set(range(8))  # socket 0's GPUs stay on socket 0
    for cpus in slices.values():  # a physical core comes with both its hyperthreads
        assert {c for c in cpus if c < 16} == {c - 16 for c in cpus if c >= 16}


def test_without_numa_information_the_cores_are_split_evenly() -> None:
    slices = core_slices([gpu(0), gpu(1), gpu(2)], range(7))
    assert slices == {"GPU-0": (0, 1), "GPU-1": (2, 3), "GPU-2": (4, 5)}


def test_fewer_cores_than_gpus_pins_nothing() -> None:
    assert core_slices([gpu(0), gpu(1), gpu(2)], [0, 1]) == {}
    assert core_slices([gpu(0), gpu(1)], [0, 16], SIBLING) == {}  # two threads of one physical core


def test_nvml_affinity_words_become_core_numbers() -> None:
    class FakeNvml:
        @staticmethod
        def nvmlDeviceGetCpuAffinity(handle, words):  # noqa: N802 (NVML's name)
            assert words >= 2
            return [0b1011, 1] + [0] * (words - 2)

    assert _near_cpus(FakeNvml, handle=None) == (0, 1, 3, 64)


def test_cpu_lists_read_and_written_in_the_kernels_format(tmp_path: Path) -> None:
    assert cpu_list_text([3, 0, 1, 2, 8, 10, 11]) == "0-3,8,10-11"
    for cpu in USABLE:
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(f"{cpu % 2},{cpu % 2 + 2}-{cpu % 2 + 3}\n")
    usable, core_of = probe_cores(tmp_path)
    assert usable == USABLE
    assert core_of == {cpu: cpu % 2 for cpu in USABLE}


@needs_two_cores
def test_spawn_pins_the_child_before_it_starts_any_thread() -> None:
    code = "import os, threading; t = threading.Thread(target=lambda: print(sorted(os.sched_getaffinity(0))))"
    proc = spawn([sys.executable, "-c", code + "; t.start(); t.join()"], {}, [USABLE[1]])
    out, _ = proc.communicate(timeout=30)
    assert out.decode().strip() == f"[{USABLE[1]}]"


@needs_two_cores
def test_recipes_on_two_gpus_run_on_disjoint_cores(host, monkeypatch, capsys) -> None:
    assert (
        main(["--recipes", "r1,r2", "--gpus", "0,1", "--max-steps", "2", "--output-dir", str(host.out)]) == 0
    )
    cores = [set(record["cpus"]) for record in host.records()]
    assert len(cores) == 2
    assert cores[0] and cores[1] and not cores[0] & cores[1]
    assert cores[0] | cores[1] <= set(USABLE)
    log = (host.launch_dirs()[0] / "logs" / "r1-llm-only.log").read_text()
    assert "# cores: " in log


@needs_two_cores
def test_pin_cpus_off_leaves_every_core_to_every_worker(host, monkeypatch, capsys) -> None:
    off = ["--pin-cpus", "off", "--output-dir", str(host.out)]
    assert main(["--recipes", "r1,r2", "--gpus", "0,1", "--max-steps", "2", *off]) == 0
    assert [record["cpus"] for record in host.records()] == [USABLE, USABLE]


@needs_two_cores
def test_plan_shows_each_jobs_cores(host, monkeypatch, capsys) -> None:
    assert main(["plan", "--recipes", "r1,r2", "--gpus", "0,1", "--output-dir", str(host.out)]) == 0
    out = capsys.readouterr().out
    assert out.count("cores:   ") == 2
