"""datamodules.resumable: DistributedSampler's order that starts mid-epoch, and fits that resume exactly from it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DistributedSampler

from datamodules.lra import PathfinderDataModule
from datamodules.mqar import MQARDataModule
from datamodules.resumable import ResumableDataLoader, ResumableSampler
from lightning_modules.optim import OptimizerConfig
from lightning_modules.sequence_classifier import SequenceClassifier
from tests.helpers import LossRecorder


def test_resumable_sampler_matches_distributed_sampler_and_skips_once():
    data = list(range(37))
    sampler = ResumableSampler(data, shuffle=True, seed=3)
    sampler.set_epoch(2)
    reference = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True)
    reference.set_epoch(2)
    full = list(reference)
    assert list(sampler) == full
    sampler.start = 10
    assert list(sampler) == full[10:]
    assert list(sampler) == full


def test_a_position_at_an_epochs_end_resumes_at_the_start_of_the_next_epoch():
    # what a checkpoint written at an epoch's last batch recorded before the trainer's position said so
    data = list(range(12))
    loader = ResumableDataLoader(
        data, batch_size=4, sampler=ResumableSampler(data, shuffle=True, seed=3), progress=lambda: (0, 0)
    )
    reference = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True)
    reference.set_epoch(3)
    loader.load_state_dict({"epoch": 2, "batches": 3, "seed": 3, "num_samples": 12})
    assert loader.sampler.epoch == 3 and list(loader.sampler) == list(reference)
    loader.load_state_dict({"epoch": 3, "batches": 1, "seed": 3, "num_samples": 12})
    assert list(loader.sampler) == list(reference)[4:]


def tiny_classifier(seed: int) -> SequenceClassifier:
    torch.manual_seed(seed)
    optim = OptimizerConfig(lr=3e-3, weight_decay=0.0, warmup_steps=2, schedule="cosine", total_steps=12)
    return SequenceClassifier("pathfinder", overrides={"hidden_size": 8, "num_layers": 2}, optim=optim)


def fit(
    data_dir, max_steps: int, callbacks, seed: int = 0, max_epochs: int | None = None, workers: int = 0, **kwargs
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )  # fmt: skip
    data = PathfinderDataModule(data_dir, difficulty="curv_baseline", batch_size=6, num_workers=workers, seed=4)
    trainer.fit(tiny_classifier(seed), datamodule=data, **kwargs)
    return trainer


@pytest.mark.parametrize(
    "max_epochs, saved_at, workers",
    [(None, 7, 0), (3, 7, 0), (3, 5, 0), (3, 5, 2)],
    ids=["max_steps", "max_epochs_and_max_steps", "at_an_epochs_last_batch", "at_an_epochs_last_batch_with_workers"],
)
def test_an_lra_fit_resumed_mid_epoch_continues_the_loss_curve_of_an_uninterrupted_one(
    pathfinder_baseline_dir, tmp_path, max_epochs, saved_at, workers
):
    # 32 training images in batches of 6: 5 batches an epoch, so the interruption at step 7 is mid-epoch. With
    # max_epochs set the schedule's length needs the epoch's length, which Lightning counts by setting up the
    # training data: before the restore, that loader would never be given the checkpoint's position. A checkpoint
    # at step 5, the first epoch's last batch, records that epoch as trained: Lightning resumes with the second
    # epoch, whose data must then start from its first batch (skipping 5 batches of it would leave it empty and,
    # under max_epochs, end the fit an epoch early); a loader with workers draws that order before Lightning sets
    # the new epoch.
    straight = LossRecorder()
    fit(pathfinder_baseline_dir, 12, [straight], max_epochs=max_epochs, workers=workers)
    first = LossRecorder(stop_at=saved_at)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=saved_at, save_top_k=0)
    fit(pathfinder_baseline_dir, 12, [first, checkpoint], max_epochs=max_epochs, workers=workers)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["loops"]["fit_loop"]["state_dict"]
    epoch, batches = divmod(saved_at, 5)  # at step 5: epoch 1, nothing of it trained
    assert state["combined_loader"][0] == {"epoch": epoch, "batches": batches, "seed": 4, "num_samples": 32}
    resumed = LossRecorder()
    fit(
        pathfinder_baseline_dir, 12, [resumed], seed=1, max_epochs=max_epochs, workers=workers,
        ckpt_path=tmp_path / "last.ckpt",
    )  # fmt: skip
    assert len(straight.losses) == 12 and len(first.losses) == saved_at and len(resumed.losses) == 12 - saved_at
    assert first.losses == pytest.approx(straight.losses[:saved_at], rel=1e-6)
    assert resumed.losses == pytest.approx(straight.losses[saved_at:], rel=1e-5)


def test_the_lra_training_loader_is_resumable_and_evaluation_keeps_every_sample(pathfinder_baseline_dir):
    data = PathfinderDataModule(pathfinder_baseline_dir, difficulty="curv_baseline", batch_size=3, num_workers=0)
    data.setup("fit")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    data.trainer = trainer
    train = data.train_dataloader()
    assert isinstance(train, ResumableDataLoader) and train.drop_last
    assert sorted(train.sampler) == list(range(32))  # one epoch visits every training image once
    assert sum(len(batch["labels"]) for batch in data.val_dataloader()) == len(data.splits["val"]) == 4


def test_the_mqar_training_loader_is_resumable_in_an_order_of_seed_and_epoch():
    data = MQARDataModule(seq_len=64, num_pairs=8, vocab_size=256, num_train=40, num_val=24, batch_size=16, seed=3)
    data.setup("fit")
    data.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    train = data.train_dataloader()
    reference = DistributedSampler(list(range(40)), num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True)
    assert isinstance(train, ResumableDataLoader) and list(train.sampler) == list(reference)
    assert sum(len(batch["labels"]) for batch in train) == 32  # two full batches: the remainder is dropped
    assert sum(len(batch["labels"]) for batch in data.val_dataloader()) == 24


class _Draws(torch.utils.data.Dataset):
    """Items that draw from Python's, NumPy's and torch's global generators, as augmentations do."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        import random

        import numpy as np

        return (index, random.random(), float(np.random.rand()), torch.rand(()).item())


def test_seeded_items_are_a_function_of_seed_epoch_and_index_and_leave_the_global_generators_alone():
    from datamodules.resumable import SeededItems

    items = SeededItems(_Draws(), seed=3)
    before = torch.get_rng_state()
    first = items[(2, 5)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator did not move
    torch.rand(10)  # whatever the global generator's state, the same key gives the same draws
    assert items[(2, 5)] == first and first[0] == 5
    assert items[(3, 5)] != first and items[(2, 6)][1:] != first[1:]
    assert SeededItems(_Draws(), seed=4)[(2, 5)] != first


def test_training_and_evaluation_loaders_take_no_number_from_the_global_generator():
    from datamodules.resumable import ordered_loader, split_loader

    before = torch.get_rng_state()
    train = ordered_loader(_Draws(), None, batch_size=4, shuffle=True, seed=1, resumable=False, augmented=True)
    evaluation = split_loader(list(range(8)), None, train=False, seed=1, batch_size=4, num_workers=0)
    assert len([*train, *evaluation]) == 4
    assert torch.equal(torch.get_rng_state(), before)  # no base seed drawn, no augmentation drawn from it
