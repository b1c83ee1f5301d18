"""Pure planning and GPU probing: recipes + GPUs + options -> job specs, no process started."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from recipe_runner.host.gpus import GpuInfo, NvmlUnavailable, parse_fake_gpus, probe_gpus, probe_nvml
from recipe_runner.planning.gpu_choice import select_gpus
from recipe_runner.planning.jobs import (
    alone,
    bind_gpus,
    build_jobs,
    resume_spec,
    split_threads,
    worker_command,
)
from recipe_runner.planning.placement import GpuRoom, first_wave
from recipe_runner.planning.request import parse_gpu_ids, resolve_recipes
from src.contract.env import BUDGET_ENV
from src.contract.flags import TrainFlags, flag_value

WORKER = ["py", "-m", "src.training.worker"]
LAUNCH = Path("/runs/20261126-041500-ab12")


def gpu(index: int, **fields) -> GpuInfo:
    return GpuInfo(index=index, uuid=f"GPU-{index:08x}-aaaa", **fields)


def never_leased(_gpu: GpuInfo) -> None:
    return None


def test_recipes_by_key_alias_and_all_in_order_each_once() -> None:
    assert resolve_recipes("r3,r1-llm-only") == ["r3-two-stage", "r1-llm-only"]
    with pytest.raises(ValueError, match="r1-llm-only is named twice"):
        resolve_recipes("r3,r1-llm-only,r1")
    assert resolve_recipes("all") == ["r1-llm-only", "r2-vision-only", "r3-two-stage", "r4-joint"]
    with pytest.raises(ValueError, match="unknown recipe 'r9'.*r1-llm-only"):
        resolve_recipes("r1,r9")
    with pytest.raises(ValueError, match="no recipe"):
        resolve_recipes(" , ")


def test_gpu_ids() -> None:
    assert parse_gpu_ids("0,2") == [0, 2]
    assert parse_gpu_ids("auto") is None
    for bad in ("x", "0,0", "-1", ""):
        with pytest.raises(ValueError, match="--gpus"):
            parse_gpu_ids(bad)


def test_job_argv_passes_training_flags_through_and_names_the_output_dir() -> None:
    flags = TrainFlags(
        model_id="m", dataset="d", epochs=2.0, max_steps=5, learning_rate=1e-4, seed=7, no_wandb=True
    )
    (job,) = build_jobs(["r1-llm-only"], LAUNCH, flags, WORKER)
    assert job.argv == (
        *WORKER,
        "--recipe",
        "r1-llm-only",
        "--output-dir",
        str(LAUNCH / "r1-llm-only"),
        "--model-id",
        "m",
        "--dataset",
        "d",
        "--epochs",
        "2",
        "--max-steps",
        "5",
        "--learning-rate",
        "0.0001",
        "--seed",
        "7",
        "--no-wandb",
        "--baseline-dir",  # the first job of a data set also evaluates the untrained model
        str(LAUNCH / "base"),
    )
    assert job.log_path == LAUNCH / "logs" / "r1-llm-only.log"
    assert "--gpu" not in job.argv and "--cpu" not in job.argv  # the device comes through the env
    (job,) = build_jobs(["r1-llm-only"], LAUNCH, TrainFlags(logging_steps=5, save_steps=0), WORKER)
    assert job.argv[job.argv.index("--logging-steps") + 1] == "5"
    assert job.argv[job.argv.index("--save-steps") + 1] == "0"


def test_gpu_job_gets_its_device_by_uuid_and_the_multicast_switches() -> None:
    (job,) = build_jobs(["r2-vision-only"], LAUNCH, TrainFlags(), WORKER)
    bound = bind_gpus(job, [gpu(1)])
    assert bound.env["CUDA_VISIBLE_DEVICES"] == "GPU-00000001-aaaa"
    assert bound.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert bound.env["NCCL_NVLS_ENABLE"] == "0"
    assert bound.env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == bound.env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert bound.device == "gpu1"
    two = bind_gpus(job, [gpu(2), gpu(3)])
    assert two.env["CUDA_VISIBLE_DEVICES"] == "GPU-00000002-aaaa,GPU-00000003-aaaa"
    assert two.device == "gpu2,3"
    assert "CUDA_VISIBLE_DEVICES" not in job.env  # binding makes a new spec


def test_a_job_run_alone_or_resumed_has_its_gpu_whole_and_no_budget(tmp_path: Path) -> None:
    (job,) = build_jobs(["r1-llm-only"], tmp_path, TrainFlags(), WORKER)
    packed = replace(bind_gpus(job, [gpu(0)]), env={**job.env, BUDGET_ENV: "20480"}, reserve_mib=21_504)
    solo = alone(packed)
    assert solo.reserve_mib is None and BUDGET_ENV not in solo.env  # its worker is not capped
    assert solo.argv == packed.argv and solo.env["NCCL_NVLS_ENABLE"] == "0"  # otherwise the same job
    result = SimpleNamespace(
        recipe=job.recipe,
        name=job.recipe,
        argv=list(packed.argv),
        env=packed.env,
        output_dir=str(tmp_path / "r1"),
        log=str(tmp_path / "r1.log"),
        gpu_uuids=["GPU-0"],
    )
    assert BUDGET_ENV not in resume_spec(result).env  # a resume does not pack


def test_cpu_jobs_split_threads_and_set_the_thread_env() -> None:
    threads = split_threads(8, 3)
    jobs = build_jobs(
        ["r1-llm-only", "r3-two-stage", "r4-joint"], LAUNCH, TrainFlags(), WORKER, cpu_threads=threads
    )
    assert threads == 2
    for job in jobs:
        assert "--cpu" in job.argv and flag_value(job.argv, "--threads") == "2"
        assert job.env["OMP_NUM_THREADS"] == job.env["MKL_NUM_THREADS"] == "2"
        assert job.env["CUDA_VISIBLE_DEVICES"] == ""
        assert job.device == "cpu"
    assert split_threads(2, 4) == 1


def test_r3_is_one_job() -> None:
    jobs = build_jobs(resolve_recipes("r3"), LAUNCH, TrainFlags(), WORKER)
    assert [job.recipe for job in jobs] == ["r3-two-stage"]


def test_three_recipes_on_two_gpus_queue_the_third() -> None:
    jobs = build_jobs(resolve_recipes("r1,r2,r4"), LAUNCH, TrainFlags(), WORKER)
    whole = [(1, None)] * len(jobs)  # no memory plan: each job takes its GPUs whole

    def devices(wave) -> list:
        return [",".join(g.label for g in gpus) if gpus else None for gpus in wave]

    rooms = [GpuRoom(gpu(i), 81559) for i in range(2)]
    assert devices(first_wave(whole, [0] * 3, rooms, max_jobs=4)) == ["gpu0", "gpu1", None]
    rooms = [GpuRoom(gpu(i), 81559) for i in range(4)]
    wave = first_wave([(2, None)] * 3, [0] * 3, rooms, max_jobs=4)
    assert devices(wave) == ["gpu0,gpu1", "gpu2,gpu3", None]


def test_select_asked_gpus_missing_busy_and_leased() -> None:
    host = [gpu(0), gpu(1, processes=(99,)), gpu(2, memory_used_mib=5000), gpu(3)]
    leased = {host[3].uuid: "pid 42 recipe r1-llm-only"}
    selection = select_gpus(host, [0, 1, 2, 3], 2048, lambda g: leased.get(g.uuid))
    assert [g.index for g in selection.pool] == [0, 1, 2, 3]
    assert not selection.missing
    assert len(selection.busy) == 3
    assert "gpu1" in selection.busy[0] and "pid 99" in selection.busy[0]
    assert "5000 MiB" in selection.busy[1]
    assert "pid 42" in selection.busy[2]
    assert selection.problems(wait=True) == []
    missing = select_gpus(host, [0, 7], 2048, never_leased)
    assert missing.problems(wait=True) == ["no GPU with index 7 (this host has: 0, 1, 2, 3)"]
    assert select_gpus(host, [0], 2048, never_leased, per_job=2).problems(wait=True)


def test_select_auto_takes_the_free_gpus_or_all_to_wait_on() -> None:
    host = [gpu(0, processes=(5,)), gpu(1), gpu(2)]
    assert [g.index for g in select_gpus(host, None, 2048, never_leased).pool] == [1, 2]
    all_busy = [gpu(0, processes=(5,)), gpu(1, memory_used_mib=9000)]
    selection = select_gpus(all_busy, None, 2048, never_leased)
    assert selection.problems(wait=False) and selection.problems(wait=True) == []
    assert [g.index for g in selection.pool] == [0, 1]
    assert select_gpus([], None, 2048, never_leased).problems(wait=True) == ["NVML sees no GPU on this host"]


def test_free_rule() -> None:
    assert gpu(0, memory_used_mib=2047).is_free(2048)
    assert not gpu(0, memory_used_mib=2048).is_free(2048)
    assert not gpu(0, processes=(1,)).is_free(10**6)


def test_fake_gpus_hook(tmp_path: Path) -> None:
    assert [g.uuid for g in parse_fake_gpus("2")] == ["GPU-fake-0000", "GPU-fake-0001"]
    two = parse_fake_gpus('[{"memory_used_mib": 9000, "processes": [3]}, {"name": "X"}]')
    assert two[0].processes == (3,) and two[1].name == "X" and two[1].index == 1
    path = tmp_path / "gpus.json"
    path.write_text("[{}]")
    assert len(probe_gpus({"RECIPE_RUNNER_FAKE_GPUS": f"@{path}"})) == 1
    with pytest.raises(NvmlUnavailable):
        probe_gpus({"RECIPE_RUNNER_FAKE_GPUS": "none"})


class FakeNvml:
    """Just enough of pynvml for probe_nvml."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init, self.shut = fail_init, False

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:  # noqa: N802
        return f"GPU-{handle}".encode()

    def nvmlDeviceGetName(self, handle: int) -> str:  # noqa: N802
        return "NVIDIA H100"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=(3000 if handle else 1) * 1024 * 1024, total=81559 * 1024 * 1024)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:  # noqa: N802
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:  # noqa: N802
        return [SimpleNamespace(pid=1234)] if handle else []

    def nvmlDeviceGetCpuAffinity(self, handle: int, words: int) -> list[int]:  # noqa: N802
        if handle:
            raise self.NVMLError("Not Supported")
        return [0xFF00] + [0] * (words - 1)  # cores 8-15


def test_probe_nvml_reads_devices_and_tolerates_unsupported_queries() -> None:
    nvml = FakeNvml()
    gpus = probe_nvml(nvml)
    assert nvml.shut
    assert gpus[0] == GpuInfo(0, "GPU-0", "NVIDIA H100", 1, 81559, None, (), tuple(range(8, 16)))
    assert gpus[1].processes == (1234,) and gpus[1].memory_used_mib == 3000
    assert gpus[1].near_cpus == ()  # affinity not supported there: no cores to prefer, still usable
    assert gpus[0].is_free() and not gpus[1].is_free()


def test_probe_nvml_without_driver_raises_a_clear_error() -> None:
    with pytest.raises(NvmlUnavailable, match="NVML could not start: NVML Shared Library Not Found"):
        probe_nvml(FakeNvml(fail_init=True))


def test_worker_command_override() -> None:
    assert worker_command({})[1:] == ["-m", "src.training.worker"]
    assert worker_command({"RECIPE_RUNNER_WORKER": '["python", "fake.py"]'}) == ["python", "fake.py"]
    with pytest.raises(ValueError, match="RECIPE_RUNNER_WORKER"):
        worker_command({"RECIPE_RUNNER_WORKER": '"python fake.py"'})
