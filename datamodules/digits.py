"""scikit-learn's bundled handwritten digits (1,797 real 8×8 images, 10 classes) for an offline CPU demo.

The images ship with scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded. They are
upsampled to ``image_size`` (bilinear), scaled to [0, 1], normalised, and split into train / validation with a
fixed seed, stratified by class. The training order and each image's random shift are functions of the seed and
the epoch (``datamodules.resumable``), so a fit resumed mid-epoch continues exactly.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from datamodules.resumable import loader_generator, ordered_loader

DIGITS_MAX = 16.0  # pixel values in load_digits are integers 0..16


def load_digit_tensors(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as images ``[1797, 1, image_size, image_size]`` in [0, 1] and labels ``[1797]`` (int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        message = "the digits demo needs scikit-learn, which ships its images: pip install -e '.[demo]'"
        raise ImportError(message) from error

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / DIGITS_MAX)[:, None]  # [N, 1, 8, 8]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1), torch.from_numpy(digits.target.astype(np.int64))


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) with ``val_fraction`` of every class in val, shuffled by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = int(round(val_fraction * len(members)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train), torch.cat(val)


class _RandomShift(Dataset):
    """Training view: each image shifted by up to ``max_shift`` pixels (zero fill), a label-preserving jitter."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int):
        self.images, self.labels, self.max_shift = images, labels, max_shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]  # [1, S, S]
        if self.max_shift:
            s = self.max_shift
            dy, dx = torch.randint(-s, s + 1, (2,)).tolist()
            image = F.pad(image, (s, s, s, s))[:, s + dy : s + dy + image.shape[1], s + dx : s + dx + image.shape[2]]
        return image, self.labels[index]


class DigitsDataModule(pl.LightningDataModule):
    """The sklearn digits as 1-channel ``image_size``² images; 10 classes; train/val split stratified by ``seed``."""

    num_classes = 10
    in_chans = 1

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        max_shift: int = 2,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the digits are 8×8), got {image_size}")
        self.save_hyperparameters()
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        images, labels = load_digit_tensors(h.image_size)
        train_idx, val_idx = stratified_split(labels, h.val_fraction, h.seed)
        mean, std = images[train_idx].mean(), images[train_idx].std()
        images = (images - mean) / std
        self.train_set = _RandomShift(images[train_idx], labels[train_idx], h.max_shift)
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def _loader(self, dataset, train: bool) -> DataLoader:
        h = self.hparams
        options = dict(batch_size=h.batch_size, num_workers=h.num_workers, persistent_workers=h.num_workers > 0)
        if not train:
            return DataLoader(dataset, generator=loader_generator(h.seed), **options)
        # the resumable order; each image's shift a function of (seed, epoch, image)
        return ordered_loader(
            dataset, self.trainer, shuffle=True, seed=h.seed, resumable=True, augmented=True, drop_last=True, **options
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
