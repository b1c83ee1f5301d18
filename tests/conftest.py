"""Shared fixtures: the offline tiny Qwen2-VL and shapes data set, built once per session; the launcher's
fake GPU host and fake worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped visibly (with a reason in the summary) where CUDA is absent."""
    if not any("gpu" in item.keywords for item in items):
        return
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: see docs/benchmarks.md)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_fixtures(tmp_path_factory) -> tuple[Path, Path]:
    """(model_dir, data_dir) of the offline fixtures; reuses $RECIPE_RUNNER_FIXTURES if set."""
    from src.fixtures.build import build_test_fixtures

    root = Path(os.environ.get("RECIPE_RUNNER_FIXTURES") or tmp_path_factory.mktemp("fixtures"))
    return build_test_fixtures(root, train=16, test=8)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_fixtures) -> Path:
    return tiny_fixtures[0]


@pytest.fixture(scope="session")
def tiny_data_dir(tiny_fixtures) -> Path:
    return tiny_fixtures[1]


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from src.models.loader import load_processor

    return load_processor(str(tiny_model_dir))


def worker_argv(recipe: str, model_dir, data_dir, out, *extra: str) -> list[str]:
    """The worker's command line as the tests run it: a few small steps, no W&B."""
    return [
        sys.executable,
        str(REPO / "scripts" / "train_recipe.py"),
        "--recipe",
        recipe,
        "--model-id",
        str(model_dir),
        "--dataset",
        str(data_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--no-wandb",
        *extra,
    ]


def tiny_run_options(model_dir, data_dir, out, **overrides):
    """RunOptions for a few quick steps on the tiny fixtures; tests override what they vary."""
    from src.training.options import RunOptions

    settings = {"device": "cpu", "max_steps": 3, "batch_size": 2, "learning_rate": 1e-2, **overrides}
    return RunOptions(model_id=str(model_dir), dataset=str(data_dir), output_dir=out, **settings)


def exact_lora(model):
    """`model` ready for exact comparisons of gradients: lora_B off its zero init (which would leave every
    lora_A gradient zero) and dropout off; returns it."""
    import torch

    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def tiny_batch(model_dir, data_dir, device: str, samples: int = 3) -> dict:
    """The collated first `samples` training samples of the tiny data set, on `device`."""
    from src.data.collators import AssistantOnlyCollator
    from src.data.dataset import build_dataset
    from src.models.loader import load_processor

    processor = load_processor(str(model_dir))
    dataset, _ = build_dataset(str(data_dir), "train", "qwen2_vl", processor)
    batch = AssistantOnlyCollator(processor)([dataset[i] for i in range(samples)])
    return {key: value.to(device) for key, value in batch.items()}


def loss_and_grads(model, batch) -> tuple[float, dict]:
    """One forward and backward from zeroed gradients: the loss and a copy of every gradient (fp32)."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_qwen2_5_vl():
    """A random one-layer Qwen2.5-VL (windowed vision tower), built in memory: the other family."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }
    vision = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 4,
        "fullatt_block_indexes": [0],
    }
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))


# ---------------------------------------------------------------- the launcher's fakes
# A fake GPU host, a fake worker, and cleanup of stray processes: the `host` fixture points the
# launcher's testing hooks at fakes (RECIPE_RUNNER_FAKE_GPUS, RECIPE_RUNNER_WORKER -> tests/fakes/worker.py)
# and its leases at a private directory, both for in-process `main()` calls (monkeypatched env) and for
# launchers run as subprocesses (`host.env`).
FAKE_WORKER = REPO / "tests" / "fakes" / "worker.py"


@dataclass
class FakeHost:
    tmp: Path
    env: dict[str, str]  # the whole environment for a launcher subprocess

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def records_dir(self) -> Path:
        return self.tmp / "records"

    @property
    def lease_dir(self) -> Path:
        return self.tmp / "leases"

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.records_dir.glob("*.json"))]

    def wait_for_records(self, count: int, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.records()
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"expected {count} worker records, found {len(self.records())}")

    def launch_dirs(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_dir()) if self.out.exists() else []

    def summary(self) -> dict:
        (launch,) = self.launch_dirs()
        return json.loads((launch / "summary.json").read_text())

    def launcher(self, *args: str, **kwargs) -> subprocess.Popen:
        """`python -m recipe_runner ARGS` as a subprocess of the test, output to one pipe."""
        return subprocess.Popen(
            [sys.executable, "-m", "recipe_runner", *args],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **kwargs,
        )

    def set_behaviour(self, monkeypatch: pytest.MonkeyPatch, table: dict) -> None:
        monkeypatch.setenv("FAKE_WORKER", json.dumps(table))
        self.env["FAKE_WORKER"] = json.dumps(table)

    def set_gpus(self, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
        monkeypatch.setenv("RECIPE_RUNNER_FAKE_GPUS", value)
        self.env["RECIPE_RUNNER_FAKE_GPUS"] = value


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHost]:
    hooks = {
        "RECIPE_RUNNER_FAKE_GPUS": "2",
        "RECIPE_RUNNER_WORKER": json.dumps([sys.executable, str(FAKE_WORKER)]),
        "RECIPE_RUNNER_LEASE_DIR": str(tmp_path / "leases"),
        "FAKE_WORKER_RECORDS": str(tmp_path / "records"),
        "FAKE_WORKER": "{}",
    }
    (tmp_path / "records").mkdir()
    for key, value in hooks.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeHost(tmp_path, {**os.environ, **hooks})
    yield fake
    _kill_leftovers(fake)


def _kill_leftovers(fake: FakeHost) -> None:
    # A failing test must not leave sleeping fakes behind for the next one.
    for record in fake.records():
        for pid in (record.get("pid"), record.get("grandchild")):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped yet."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def helpers():
    """The plain helper functions, for tests that need them without importing conftest."""
    return type("Helpers", (), {"alive": staticmethod(alive), "wait_until": staticmethod(wait_until)})


@pytest.fixture(scope="session")
def config_only_7b(tmp_path_factory):
    """The published 7B shape as config.json alone (no weights: the planner never loads them),
    with Qwen's pixel limits, and 644x476 images (391 image tokens each)."""
    from src.fixtures.shapes import shape_config
    from src.fixtures.synthetic import write_dataset
    from src.fixtures.tiny import build_tokenizer
    from src.planning.shapes import MAX_PIXELS, MIN_PIXELS

    root = tmp_path_factory.mktemp("plan7b")
    model = root / "7b"
    model.mkdir()
    shape_config("7b", build_tokenizer()).to_json_file(model / "config.json")
    (model / "preprocessor_config.json").write_text(
        json.dumps({"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})
    )
    data = write_dataset(root / "data", train=3, test=1, size=(644, 476))
    return model, data


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3-VL in the hub's layout (sharded safetensors, nested config, patch 16)."""
    from src.fixtures.tiny_qwen3 import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3vl") / "tiny-qwen3-vl")


@pytest.fixture(scope="session")
def tiny_qwen3_5_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3.5 (three Gated DeltaNet layers, then full attention) in the hub's layout."""
    from src.fixtures.tiny_qwen3 import build_tiny_qwen3_5

    return build_tiny_qwen3_5(tmp_path_factory.mktemp("qwen35") / "tiny-qwen3.5")


@pytest.fixture(scope="session")
def config_only_qwen3_vl_8b(tmp_path_factory):
    """Qwen3-VL-8B-Instruct's published config.json and preprocessor_config.json alone (no weights),
    and 644x476 images (480x640 after resizing: 300 image tokens each)."""
    from src.fixtures.shapes import write_config_only
    from src.fixtures.synthetic import write_dataset

    root = tmp_path_factory.mktemp("plan-qwen3-vl-8b")
    model = write_config_only("qwen3-vl-8b", root / "qwen3-vl-8b")
    data = write_dataset(root / "data", train=3, test=1, size=(644, 476))
    return model, data


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A local Ray in this process with two logical GPUs, for the Ray backend's tests (marked `ray`)."""
    ray = pytest.importorskip("ray")
    # address="local": always a new cluster of our own, never a head some `ray start` left running
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_coco_dir(tiny_data_dir, tmp_path_factory) -> Path:
    """The tiny shapes data set in COCO's layout (two instances files: train and a held-out split)."""
    return write_coco_from_shapes(tiny_data_dir, tmp_path_factory.mktemp("coco") / "coco")


def write_coco_from_shapes(data_dir: Path, root: Path) -> Path:
    """The tiny shapes data set in COCO's layout: annotations/instances_{train,val}2017.json beside the
    train2017/ and val2017/ image folders; the train split gives train, the test split val."""
    for split, coco_split in (("train", "train2017"), ("test", "val2017")):
        rows = [json.loads(line) for line in (data_dir / split / "metadata.jsonl").read_text().splitlines()]
        labels = sorted({label for row in rows for label in row["objects"]["label"]})
        category = {label: index + 1 for index, label in enumerate(labels)}
        (root / coco_split).mkdir(parents=True)
        images, annotations = [], []
        for index, row in enumerate(rows):
            source = data_dir / split / row["file_name"]
            (root / coco_split / source.name).write_bytes(source.read_bytes())
            images.append({"id": index + 1, "file_name": source.name, "width": 112, "height": 112})
            for box, label in zip(row["objects"]["bbox"], row["objects"]["label"], strict=True):
                x1, y1, x2, y2 = box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index + 1,
                        "category_id": category[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                    }
                )
        coco = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": "shape"} for n, i in category.items()],
        }
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{coco_split}.json").write_text(json.dumps(coco))
    return root
