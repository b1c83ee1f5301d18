"""Micro-batches of equal image sizes (src/training/size_groups.py): the sampler only reorders (every image
once an epoch, the same micro-batches a step, a fixed model's loss the same over each window of steps),
groups sizes where counts allow, follows the seed and the epoch, leaves a data set of one size in the
plain shuffled order, and keeps data parallelism and resume right through the trainer's and accelerate's
own data loaders. Image sizes come from the files' headers and match what the processor makes of them.
"""

import random

import pytest
import torch
from accelerate import skip_first_batches
from accelerate.data_loader import SeedableRandomSampler, prepare_data_loader

from src.training.levers import resolve_group_by_size
from src.training.options import RunOptions
from src.training.size_groups import (
    WINDOW_STEPS,
    SizeGroupedSampler,
    describe,
    plain_order,
    sized_trainer,
    uniform_micro_batches,
)

PATCHES = (1564, 1380, 936)  # 640x480 (and 480x640), 640x427, 500x375 as Qwen2-VL resizes them


def mixed_keys(count: int, sizes=PATCHES, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(sizes) for _ in range(count)]


def micro_batches(order, micro_batch: int) -> list[list[int]]:
    return [list(order[i : i + micro_batch]) for i in range(0, len(order), micro_batch)]


@pytest.mark.parametrize("count, micro_batch, accum", [(1200, 4, 4), (257, 4, 2), (10, 4, 1)])
def test_every_image_comes_once_an_epoch_in_as_many_micro_batches_as_unsorted(count, micro_batch, accum):
    keys = mixed_keys(count)
    sampler = SizeGroupedSampler(keys, micro_batch * accum, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(count)) and len(sampler) == count
        grouped, plain = (
            micro_batches(order, micro_batch),
            micro_batches(plain_order(count, 3, epoch), micro_batch),
        )
        # the same micro-batches of the same sizes, so the same optimizer steps of the same samples each
        assert [len(batch) for batch in grouped] == [len(batch) for batch in plain]


@pytest.mark.parametrize("sizes", [PATCHES[:2], PATCHES])
@pytest.mark.parametrize("micro_batch, accum", [(4, 4), (8, 2), (2, 8)])
def test_micro_batches_are_of_one_size_where_counts_allow(sizes, micro_batch, accum):
    keys = mixed_keys(4000, sizes)
    sampler = SizeGroupedSampler(keys, micro_batch * accum, seed=0)
    assert sampler.window_steps() == WINDOW_STEPS  # a large data set: windows of 50 steps
    uniform, total = uniform_micro_batches(keys, sampler.order(0), micro_batch)
    plain, _ = uniform_micro_batches(keys, plain_order(len(keys), 0), micro_batch)
    assert uniform / total >= 0.9, (uniform, total)
    assert plain / total < 0.6  # shuffled, few are: 1/2 for pairs of two sizes, far fewer otherwise
    # a window holds len(sizes) runs of one size: at most len(sizes) - 1 mixed micro-batches, and the
    # largest sample's swap to the front may break two more
    windows = -(-len(keys) // (WINDOW_STEPS * micro_batch * accum))
    assert total - uniform <= windows * (len(sizes) - 1) + 2


def test_the_loss_is_unchanged_over_each_window_and_in_expectation():
    # A fixed model's loss per sample, larger for larger images (the worst case for a reordering). A
    # step's loss is the mean of its 16 samples. Grouping reorders within windows of the same shuffle, so
    # every window's and the epoch's mean loss stay the plain order's (but for the one largest sample
    # transformers' grouping swaps into the first window), and in expectation over seeds so does each.
    count, per_step = 4000, 16
    keys = mixed_keys(count)
    rng = random.Random(1)
    loss = [key / 1000 + rng.gauss(0, 0.3) for key in keys]
    window = SizeGroupedSampler(keys, per_step, seed=0).window_steps() * per_step

    def window_means(order):
        return [
            sum(loss[i] for i in order[start : start + window]) / window for start in range(0, count, window)
        ]

    gaps = []
    for seed in range(40):
        grouped, plain = (
            window_means(SizeGroupedSampler(keys, per_step, seed).order(0)),
            window_means(plain_order(count, seed)),
        )
        assert sum(grouped) == pytest.approx(sum(plain), abs=1e-9)  # the epoch: every sample once
        moved = [abs(g - p) for g, p in zip(grouped, plain, strict=True) if abs(g - p) > 1e-9]
        assert len(moved) <= 2 and all(gap < 2 / window for gap in moved)  # the one swapped sample
        gaps.append(grouped[0] - plain[0])
    assert abs(sum(gaps) / len(gaps)) < 1e-3


def test_a_small_data_set_keeps_four_windows_an_epoch():
    keys = mixed_keys(256)
    sampler = SizeGroupedSampler(keys, 16, seed=0)
    assert sampler.window_steps() == 4  # 256 // (16 * 4): four windows of 64, as transformers' rule has it
    order = sampler.order(0)
    assert [sorted(order[i : i + 64]) for i in range(0, 256, 64)] == [
        sorted(plain_order(256, 0)[i : i + 64]) for i in range(0, 256, 64)
    ]  # grouping only reorders inside each shuffled window
    assert SizeGroupedSampler(mixed_keys(10), 16, seed=0).window_steps() == 1


def test_the_order_follows_the_seed_and_the_epoch_only():
    keys = mixed_keys(600)
    first, again = SizeGroupedSampler(keys, 16, seed=1), SizeGroupedSampler(keys, 16, seed=1)
    assert first.order(0) == again.order(0) and first.order(2) == again.order(2)
    assert first.order(0) != SizeGroupedSampler(keys, 16, seed=2).order(0)
    assert first.order(0) != first.order(1)
    torch.manual_seed(123)  # the global generator plays no part
    assert list(first) == again.order(0) and list(first) == again.order(
        1
    )  # a full pass moves to the next epoch


def test_a_data_set_of_one_size_keeps_the_plain_shuffled_order():
    keys = [1564] * 100
    sampler = SizeGroupedSampler(keys, 8, seed=42)
    for epoch in range(3):
        plain = SeedableRandomSampler(data_source=range(100), data_seed=42)  # what the trainer shuffles with
        plain.set_epoch(epoch)
        assert sampler.order(epoch) == list(plain) == plain_order(100, 42, epoch)


class _Indices(torch.utils.data.Dataset):
    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return {"index": torch.tensor(index)}


def _trainer(trainer_class, tmp_path, count: int, micro_batch: int, seed: int):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=micro_batch,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,  # as the core's config: the batch keeps what the model does not take
    )
    return trainer_class(model=torch.nn.Linear(1, 1), args=args, train_dataset=_Indices(count))


def _epoch(loader, epoch: int) -> list[list[int]]:
    loader.set_epoch(epoch)  # as the trainer does before each epoch
    return [batch["index"].tolist() for batch in loader]


def test_the_trainer_draws_through_the_sampler_and_one_size_changes_nothing(tmp_path):
    from transformers import Trainer

    count, micro = 40, 4
    mixed = SizeGroupedSampler(mixed_keys(count), micro, seed=5)
    grouped = _trainer(sized_trainer(Trainer, mixed), tmp_path, count, micro, seed=5).get_train_dataloader()
    assert _epoch(grouped, 1) == micro_batches(mixed.order(1), micro)

    one_size = SizeGroupedSampler([80] * count, micro, seed=5)
    same = _trainer(sized_trainer(Trainer, one_size), tmp_path, count, micro, seed=5).get_train_dataloader()
    plain = _trainer(Trainer, tmp_path, count, micro, seed=5).get_train_dataloader()
    for epoch in range(2):
        assert _epoch(same, epoch) == _epoch(plain, epoch)


def test_a_resumed_trainer_meets_the_samples_of_an_uninterrupted_one(tmp_path):
    """The trainer resumes in epoch e by setting that epoch and skipping the batches already trained."""
    from transformers import Trainer

    count, micro, keys = 48, 4, mixed_keys(48)
    straight = _trainer(sized_trainer(Trainer, SizeGroupedSampler(keys, micro, 9)), tmp_path, count, micro, 9)
    wanted = [_epoch(straight.get_train_dataloader(), epoch) for epoch in range(3)]
    resumed = _trainer(sized_trainer(Trainer, SizeGroupedSampler(keys, micro, 9)), tmp_path, count, micro, 9)
    skipped = skip_first_batches(resumed.get_train_dataloader(), 5)  # a fresh process: epoch 2, step 5
    assert _epoch(skipped, 2) == wanted[2][5:]


def _rank_loader(sampler, count: int, micro_batch: int, rank: int, skip: int = 0):
    """Rank `rank` of two's data loader, as accelerate prepares the trainer's and sized_trainer hands it
    the sampler; `skip` batches skipped, as a resume does."""
    loader = torch.utils.data.DataLoader(_Indices(count), batch_size=micro_batch, sampler=sampler)
    loader = prepare_data_loader(
        loader, num_processes=2, process_index=rank, put_on_device=False, use_seedable_sampler=True
    )
    loader.set_sampler(sampler)
    return skip_first_batches(loader, skip) if skip else loader


def test_data_parallel_ranks_each_take_their_share_and_resume_alike():
    count, micro = 96, 4
    keys = mixed_keys(count)
    sampler = SizeGroupedSampler(keys, micro * 2, seed=4)  # 2 ranks x micro-batch 4: 8 samples a step
    for epoch in (0, 1):
        ranks = [_epoch(_rank_loader(sampler, count, micro, rank), epoch) for rank in (0, 1)]
        whole = micro_batches(sampler.order(epoch), micro)
        assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2]  # dealt in turn: each its share, once
        assert sorted(i for rank in ranks for batch in rank for i in batch) == list(range(count))
        for rank in (0, 1):  # a resume at step 3 of this epoch: the same batches from there on
            resumed = SizeGroupedSampler(keys, micro * 2, seed=4)  # a fresh process's sampler, at epoch 0
            assert _epoch(_rank_loader(resumed, count, micro, rank, skip=3), epoch) == ranks[rank][3:]


def test_auto_groups_on_gpus_when_sizes_vary_and_reads_sizes_only_then(tmp_path):
    def resolved(device, asked=None, keys=(80, 96)):
        opts = RunOptions("m", "d", tmp_path, device=device, group_by_size=asked)
        return resolve_group_by_size(opts, lambda: keys)

    def unread():
        pytest.fail("the sizes were read")

    assert resolved("cuda") is True and resolved("cuda", keys=(80, 80)) is False
    assert resolve_group_by_size(RunOptions("m", "d", tmp_path, device="cpu"), unread) is False
    assert resolve_group_by_size(RunOptions("m", "d", tmp_path, group_by_size=True), unread) is True
    assert (
        resolve_group_by_size(RunOptions("m", "d", tmp_path, device="cuda", group_by_size=False), unread)
        is False
    )


def test_the_log_line_counts_uniform_micro_batches_grouped_and_plain():
    keys = mixed_keys(1200)
    line = describe(keys, SizeGroupedSampler(keys, 16, seed=0), 4, seed=0)
    grouped, total = uniform_micro_batches(keys, SizeGroupedSampler(keys, 16, seed=0).order(0), 4)
    assert line.startswith(f"micro-batches of one image size: {grouped} of {total} (")
    assert "in plain shuffled order" in line and "3 image size(s) in vision patches: " in line
    assert "not grouped" in describe(keys, None, 4, seed=0)


def test_image_patches_are_read_from_headers_as_the_processor_cuts_the_images(tmp_path, tiny_processor):
    from PIL import Image

    from src.fixtures.synthetic import COCO_SIZES
    from src.training.memory import image_patches

    paths = []
    for index, size in enumerate(COCO_SIZES):
        paths.append(str(tmp_path / f"{index}.png"))
        Image.new("RGB", size).save(paths[-1])
    dataset = {"images": [[path] for path in paths]}  # what image_patches reads of a datasets.Dataset
    grids = tiny_processor.image_processor([Image.open(p) for p in paths], return_tensors="pt")[
        "image_grid_thw"
    ]
    assert image_patches(dataset, tiny_processor) == grids.prod(-1).tolist()


@pytest.mark.slow
def test_a_grouped_run_resumed_in_its_second_epoch_ends_as_an_uninterrupted_one(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """The whole path: the worker's RunOptions, prepare_stage's trainer, a crash in epoch 2, --resume."""
    from safetensors.torch import load_file

    from src.contract.env import FAULT_ENV
    from src.fixtures.synthetic import write_dataset
    from src.recipes import RECIPES
    from src.training.run import run_recipe
    from tests.conftest import tiny_run_options

    # three sizes the tiny processor cuts into 64, 80 and 48 patches; 16 images: 8 steps an epoch
    data = write_dataset(tmp_path / "data", train=16, test=2, sizes=((112, 112), (140, 112), (112, 84)))
    recipe = RECIPES["r4-joint"]

    def options(out, **extra):
        settings = {"max_steps": 12, "save_steps": 2, "seed": 7, "group_by_size": True, **extra}
        return tiny_run_options(tiny_model_dir, data, tmp_path / out, **settings)

    with caplog.at_level("INFO", logger="src.training.size_groups"):
        run_recipe(recipe, options("straight"))
    assert "micro-batches of one image size: " in caplog.text and "grouped by size" in caplog.text
    monkeypatch.setenv(FAULT_ENV, "r4-joint:11")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_recipe(recipe, options("crashed"))
    monkeypatch.delenv(FAULT_ENV)
    (result,) = run_recipe(recipe, options("crashed", resume=True))  # from step 10: epoch 2, its 3rd step
    assert result.steps == 12

    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "crashed" / "adapter" / "adapter_model.safetensors")
    for name in straight:  # the same samples in the same steps: equal up to float rounding
        assert torch.allclose(straight[name], resumed[name], rtol=0, atol=1e-6), name
