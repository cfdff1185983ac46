"""Training orders that survive a restart: a sampler and DataLoader whose position Lightning checkpoints.

The order of an epoch is ``DistributedSampler``'s for the rank (a pure function of seed, epoch and rank), and the
loader's ``state_dict`` records how many batches of the epoch were trained, so a run resumed from a mid-epoch
checkpoint sees exactly the batches an uninterrupted run would have seen next. :func:`ordered_loader` builds
one for a datamodule.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s order for one rank (a function of seed and epoch), able to start mid-epoch.

    Being a ``DistributedSampler``, Lightning uses it as is instead of wrapping it. ``start`` items are
    skipped by the next iteration only (a run resumed from a mid-epoch checkpoint).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(list(super().__iter__())[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position Lightning saves in checkpoints.

    ``state_dict`` records the epoch and the number of batches trained in it (from ``progress``, the
    trainer's count, which unlike a count of fetched batches does not run ahead by the prefetched ones);
    ``load_state_dict`` makes the next iteration start right after them.
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
        self.sampler.set_epoch(state["epoch"])
        self.sampler.start = state["batches"] * self.batch_size


def replicas(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(world size, rank) of ``trainer``'s process; (1, 0) without a trainer."""
    return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)


def training_position(trainer: pl.Trainer) -> tuple[int, int]:
    """(epoch, batches of it trained so far): the training position a checkpoint records."""
    return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed


def ordered_loader(
    dataset: Dataset,
    trainer: pl.Trainer | None,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    resumable: bool,
    **loader_kwargs,
) -> DataLoader:
    """A DataLoader over a :class:`ResumableSampler` for ``trainer``'s rank (one replica without a trainer),
    at the trainer's current epoch; with ``resumable`` and a trainer, a :class:`ResumableDataLoader` whose
    position goes into checkpoints. ``loader_kwargs`` go to the DataLoader (``drop_last``, ``num_workers``, ...)."""
    world, rank = replicas(trainer)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    if trainer is not None:
        sampler.set_epoch(trainer.current_epoch)
    if resumable and trainer is not None:
        progress = partial(training_position, trainer)
        return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, progress=progress, **loader_kwargs)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_kwargs)


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
        return DataLoader(dataset, shuffle=False, **options)
    drop_last = len(dataset) >= batch_size
    return ordered_loader(dataset, trainer, shuffle=True, seed=seed, resumable=True, drop_last=drop_last, **options)
