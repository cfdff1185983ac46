"""Training orders that survive a restart: a sampler and DataLoader whose position Lightning checkpoints.

The order of an epoch is ``DistributedSampler``'s for the rank (a pure function of seed, epoch and rank), and the
loader's ``state_dict`` records how many batches of the epoch were trained, so a run resumed from a mid-epoch
checkpoint sees exactly the batches an uninterrupted run would have seen next. :func:`ordered_loader` builds
one for a datamodule. Random augmentations are made a pure function of (seed, epoch, sample) too
(:class:`SeededItems`), and every loader draws its workers' base seed from a generator of its own, so that no
loader takes numbers from the global generators that dropout draws from (``lightning_modules.resume`` saves
those with the checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable
from functools import partial

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s order for one rank (a function of seed and epoch), able to start mid-epoch.

    Being a ``DistributedSampler``, Lightning uses it as is instead of wrapping it. ``start`` items are
    skipped by the next iteration only (a run resumed from a mid-epoch checkpoint).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool,
        seed: int = 0,
        tag_epoch: bool = False,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0
        self.tag_epoch = tag_epoch  # yield (epoch, index) pairs, the keys of SeededItems

    def __iter__(self):
        start, self.start = self.start, 0
        order = list(super().__iter__())[start:]
        return iter([(self.epoch, index) for index in order] if self.tag_epoch else order)


class SeededItems(Dataset):
    """A dataset whose items draw random numbers (augmentations), each a pure function of (seed, epoch, index).

    Item ``(epoch, i)`` (the keys a ``ResumableSampler(tag_epoch=True)`` yields) is ``dataset[i]`` computed with
    Python's, NumPy's and torch's CPU generators seeded from (seed, epoch, i) and put back afterwards: the
    same sample gets the same augmentation in an uninterrupted run and a resumed one, in any worker or rank, and
    the caller's generators do not move."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        digest = hashlib.blake2b(f"{self.seed}:{epoch}:{index}".encode(), digest_size=8).digest()
        with seeded_generators(int.from_bytes(digest, "little")):
            return self.dataset[index]


@contextlib.contextmanager
def seeded_generators(seed: int):
    """Python's, NumPy's and torch's CPU generators seeded with ``seed`` inside the block, restored after it."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def loader_generator(seed: int) -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from at each ``iter()``; without one it takes a
    number from torch's global generator, which would shift the dropout of every later step in one run and
    not in another that started its iterator elsewhere (a resumed one)."""
    return torch.Generator().manual_seed(seed)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position Lightning saves in checkpoints.

    ``state_dict`` records the epoch and the number of batches trained in it (from ``progress``, the
    trainer's count, which unlike a count of fetched batches does not run ahead by the prefetched ones);
    ``load_state_dict`` makes the next iteration start right after them. A position at the end of an epoch is
    the start of the next one, where Lightning resumes such a checkpoint: a loader with workers builds its
    iterator, and so draws the epoch's order, before Lightning moves the sampler to that epoch.
    """

    def __init__(self, *args, progress: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict:
        epoch, batches = self.progress()
        return {"epoch": epoch, "batches": batches, "seed": self.sampler.seed, "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["num_samples"]) != (self.sampler.seed, len(self.dataset)):
            rank_zero_warn(
                f"the checkpoint's data order (seed {state['seed']}, {state['num_samples']} samples) is not this "
                f"run's (seed {self.sampler.seed}, {len(self.dataset)} samples): its epoch starts from the beginning"
            )
            return
        epoch, batches = state["epoch"], state["batches"]
        if batches >= len(self):  # written at an epoch's last batch (before the position below said so)
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.start = batches * self.batch_size


def replicas(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(world size, rank) of ``trainer``'s process; (1, 0) without a trainer."""
    return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)


def training_position(trainer: pl.Trainer) -> tuple[int, int]:
    """(epoch, batches of it trained so far): the training position a checkpoint records; (next epoch, 0) once an
    epoch's batches are all trained (Lightning's count, which ``limit_train_batches`` sets), since Lightning resumes
    such a checkpoint with the next epoch."""
    epoch, batches = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if batches >= trainer.num_training_batches:
        return epoch + 1, 0
    return epoch, batches


def ordered_loader(
    dataset: Dataset,
    trainer: pl.Trainer | None,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    resumable: bool,
    augmented: bool = False,
    **loader_kwargs,
) -> DataLoader:
    """A DataLoader over a :class:`ResumableSampler` for ``trainer``'s rank (one replica without a trainer),
    at the trainer's current epoch; with ``resumable`` and a trainer, a :class:`ResumableDataLoader` whose
    position goes into checkpoints; with ``augmented``, over :class:`SeededItems` of ``dataset``, for datasets
    whose items draw random numbers. ``loader_kwargs`` go to the DataLoader (``drop_last``, ``num_workers``, ...)."""
    world, rank = replicas(trainer)
    if augmented:
        dataset = SeededItems(dataset, seed)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, tag_epoch=augmented)
    if trainer is not None:
        sampler.set_epoch(trainer.current_epoch)
    options = dict(batch_size=batch_size, sampler=sampler, generator=loader_generator(seed), **loader_kwargs)
    if resumable and trainer is not None:
        return ResumableDataLoader(dataset, progress=partial(training_position, trainer), **options)
    return DataLoader(dataset, **options)


def split_loader(
    dataset: Dataset,
    trainer: pl.Trainer | None,
    *,
    train: bool,
    seed: int,
    batch_size: int,
    num_workers: int,
    collate_fn=None,
) -> DataLoader:
    """A split's loader for a classification datamodule. Training: :func:`ordered_loader`'s resumable order,
    dropping the last partial batch when there is a full one. Evaluation: every sample in order (Lightning
    gives each rank its share)."""
    options = dict(
        batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    if not train:
        return DataLoader(dataset, shuffle=False, generator=loader_generator(seed), **options)
    drop_last = len(dataset) >= batch_size
    return ordered_loader(dataset, trainer, shuffle=True, seed=seed, resumable=True, drop_last=drop_last, **options)
