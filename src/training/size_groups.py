"""Micro-batches of equal image sizes: the training sampler that groups a data set's images by their number
of vision patches within a shuffled window (`--group-by-size`, RunOptions.group_by_size).

Why: the vision tower attends in one batched SDPA call (cuDNN's kernels on Hopper) only when every image
of a micro-batch has the same number of patches (src/models/vision_attention.py, `equal_images`), else
through the varlen kernel or one call per image. Real data sets mix sizes (COCO: 640x480, 480x640,
640x427, 500x375, 612x612, 640x360, ...), and in plain shuffled order almost no micro-batch is uniform.

How: transformers' own `get_length_grouped_indices`, what its `group_by_length` does for text: a random
permutation cut into windows of up to WINDOW_STEPS optimizer steps (at least four windows an epoch), each
sorted by the sample's "length", here its image patches (`src/training/memory.py`, `image_patches`, from
the files' headers), so images of one size lie together. The sort is stable: within a size the shuffled
order stays. 640x480 and 480x640 resize to the same number of patches, so they count as one size.

What it keeps:
  * every training image exactly once an epoch and the same samples per optimizer step: it only reorders,
    and the trainer cuts its micro-batches from that order as before;
  * determinism: an epoch's order is a function of the seed, the epoch and the keys alone (a generator
    seeded with seed + epoch, as accelerate's SeedableRandomSampler seeds the trainer's plain shuffle);
  * data parallelism: every rank computes the same order and accelerate deals its micro-batches out in
    turn, each rank its share, as with the plain shuffle;
  * resume: the trainer sets the epoch before it iterates and skips the batches already trained, so a
    resumed run meets the samples an uninterrupted one would have;
  * a data set of one size: every key equal, the order is exactly the plain shuffled one (the same
    torch.randperm with the same generator), so grouping changes nothing there.

src/training/run.py's prepare_stage asks `size_sampler_for` (which logs how many micro-batches are of one
size) and builds its trainer through `sized_trainer`. The trainer asks `_get_train_sampler` for its
sampler (transformers 5.17 and 5.24 alike); `sized_trainer` returns this one, and hands it to accelerate's
data loader as accelerate does its own seedable sampler, so `set_epoch` reaches it under data parallelism
and after a resume too. Not transformers' `train_sampling_strategy="group_by_length"`: its
LengthGroupedSampler draws from the global torch generator, whose state when an epoch starts depends on
all that was drawn before (dropout included), so a resumed run, or ranks that drew differently, would see
another order.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Iterator, Sequence

from src.training import levers
from src.training.options import RunOptions
from src.utils.gpu import world_size

log = logging.getLogger(__name__)
WINDOW_STEPS = 50  # transformers' own cap on a window ("megabatch"), counted here in optimizer steps


class SizeGroupedSampler:
    """An epoch's sample indices, images of one size together within each window (module docstring).

    A plain iterable with `__len__` and `set_epoch`, not a torch RandomSampler: accelerate replaces a
    RandomSampler with its own."""

    def __init__(self, keys: Sequence[int], samples_per_step: int, seed: int):
        self.keys = list(keys)
        self.samples_per_step = samples_per_step  # over every data-parallel rank: a window is whole steps
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """Every index once, grouped by key within each window of the shuffled order of `epoch`."""
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + epoch)
        return get_length_grouped_indices(
            self.keys, self.samples_per_step, mega_batch_mult=self.window_steps(), generator=generator
        )

    def window_steps(self) -> int:
        """Optimizer steps a window holds: WINDOW_STEPS, fewer where the epoch has under four windows'
        worth (transformers' rule), at least one."""
        return max(1, min(len(self.keys) // (self.samples_per_step * 4), WINDOW_STEPS))

    def __iter__(self) -> Iterator[int]:
        yield from self.order(self.epoch)
        self.epoch += 1  # as accelerate's seedable sampler: the next pass is the next epoch unless set


def plain_order(count: int, seed: int, epoch: int = 0) -> list[int]:
    """The trainer's plain shuffled order of an epoch: accelerate's SeedableRandomSampler (which replaces
    the trainer's RandomSampler) seeds a generator with seed + epoch and draws torch.randperm."""
    import torch

    return torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def uniform_micro_batches(keys: Sequence[int], order: Sequence[int], micro_batch: int) -> tuple[int, int]:
    """(micro-batches whose samples all have one key, micro-batches) when `order` is cut into micro-batches
    as the trainer cuts it (under data parallelism the ranks take them in turn, so the same holds)."""
    batches = [order[start : start + micro_batch] for start in range(0, len(order), micro_batch)]
    uniform = sum(1 for batch in batches if len({keys[i] for i in batch}) == 1)
    return uniform, len(batches)


def describe(keys: Sequence[int], sampler: SizeGroupedSampler | None, micro_batch: int, seed: int) -> str:
    """One log line: how many micro-batches of the first epoch are of one image size, grouped (with
    `sampler`) and in the plain shuffled order, and the sizes there are, in vision patches."""
    plain, total = uniform_micro_batches(keys, plain_order(len(keys), seed), micro_batch)
    sizes = Counter(keys).most_common()
    listed = ", ".join(f"{patches} x {count}" for patches, count in sizes[:6])
    more = f", and {len(sizes) - 6} more" if len(sizes) > 6 else ""
    plain_text = f"{plain} of {total} ({plain / total:.0%})"
    if sampler is None:
        head = f"micro-batches of one image size: {plain_text}, in plain shuffled order (not grouped)"
    else:
        grouped, _ = uniform_micro_batches(keys, sampler.order(0), micro_batch)
        window = sampler.window_steps()
        head = (
            f"micro-batches of one image size: {grouped} of {total} ({grouped / total:.0%}) grouped by "
            f"size in windows of {window} optimizer step{'s' if window > 1 else ''}; {plain_text} in plain "
            "shuffled order"
        )
    return f"{head}; {len(sizes)} image size(s) in vision patches: {listed}{more}"


def size_sampler_for(stage_name: str, opts: RunOptions, dataset, processor) -> SizeGroupedSampler | None:
    """The sampler a stage draws its micro-batches through, or None for the trainer's plain shuffle
    (levers.resolve_group_by_size). Where the images' sizes were read, one log line says how many
    micro-batches are of one size."""
    from src.training.memory import image_patches

    keys = functools.cache(lambda: image_patches(dataset, processor))
    sampler = None
    if levers.resolve_group_by_size(opts, keys):
        sampler = SizeGroupedSampler(keys(), opts.batch_size * opts.grad_accum * world_size(), opts.seed)
    if keys.cache_info().currsize:  # the sizes were read: say what the order makes of them
        log.info("[%s] %s", stage_name, describe(keys(), sampler, opts.batch_size, opts.seed))
    return sampler


def sized_trainer(trainer_class: type, sampler: SizeGroupedSampler) -> type:
    """`trainer_class` (the SFTTrainer) drawing its training micro-batches through `sampler`."""

    class SizeGroupedTrainer(trainer_class):  # type: ignore[valid-type, misc]
        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if dataset is not None and len(dataset) == len(sampler):
                return sampler
            return super()._get_train_sampler(train_dataset)

        def get_train_dataloader(self):
            loader = super().get_train_dataloader()
            # What accelerate does for its own seedable sampler: under data parallelism its batch-sampler
            # shard then holds the sampler too, where set_epoch looks once a resume has skipped batches.
            if hasattr(loader, "set_sampler"):
                loader.set_sampler(sampler)
            return loader

    return SizeGroupedTrainer
