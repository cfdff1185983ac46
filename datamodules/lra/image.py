"""LRA Image: CIFAR-10 as a sequence of 1,024 grayscale pixels of 256 levels, 10 classes.

Layout (the CIFAR-10 python release, https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)::

    data_dir/data_batch_1 .. data_batch_5   data_dir/test_batch      (data_dir is cifar-10-batches-py/)

each a pickled dict with ``b"data"`` (``[N, 3072]`` uint8, the red, green and blue planes of a 32×32 image,
row-major) and ``b"labels"``. As in the LRA code the last 10 % of the training set validates, and pixels
are made gray with TensorFlow's ``rgb_to_grayscale`` (weights 0.2989, 0.5870, 0.1140, back to 8 bits by
``convert_image_dtype``, i.e. ``floor(255.5 · gray)``). ``grayscale=False`` keeps the three channels
(``[1024, 3]`` per image), which the HGRN2 authors' own CIFAR runs used.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from datamodules.lra.common import LRADataModule, collate_images

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)


def to_grayscale(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` -> uint8 ``[...]``, as ``tf.image.rgb_to_grayscale`` on uint8 images."""
    gray = (rgb.astype(np.float32) / 255.0) @ GRAY_WEIGHTS
    return np.minimum(gray * np.float32(255.5), 255).astype(np.uint8)


def read_batches(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb [N, 1024, 3] uint8, labels [N] int64)`` from CIFAR-10 python batch files."""
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{path}: b'data' must be [N, 3072] uint8 (3 planes of 32×32), got {data.shape}")
        images.append(data.reshape(-1, 3, 1024).transpose(0, 2, 1))  # [N, 1024, 3]
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


class PixelDataset(Dataset):
    """Pixel sequences held in memory: ``uint8 [N, L]`` or ``[N, L, C]`` and labels."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.pixels[index], int(self.labels[index])


class ImageDataModule(LRADataModule):
    """CIFAR-10 pixels as a 1,024-long sequence of gray levels (``uint8``; the model embeds them)."""

    num_classes = 10
    collate_fn = staticmethod(collate_images)

    def __init__(
        self,
        data_dir: str = "data/lra/cifar-10-batches-py",
        batch_size: int = 64,
        grayscale: bool = True,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(data_dir, batch_size, num_workers, seed)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.grayscale, self.val_fraction = grayscale, val_fraction

    def expected_files(self) -> list[Path]:
        return [self.data_dir / name for name in (*TRAIN_FILES, TEST_FILE)]

    def how_to_get(self) -> str:
        return f"Download {CIFAR10_URL}, unpack it and point data_dir at cifar-10-batches-py/."

    def load_splits(self) -> dict[str, PixelDataset]:
        files = self.expected_files()
        (train_rgb, train_labels), (test_rgb, test_labels) = read_batches(files[:-1]), read_batches(files[-1:])
        convert = to_grayscale if self.grayscale else np.ascontiguousarray
        train_pixels, test_pixels = convert(train_rgb), convert(test_rgb)
        cut = len(train_labels) - int(round(self.val_fraction * len(train_labels)))
        return {
            "train": PixelDataset(train_pixels[:cut], train_labels[:cut]),
            "val": PixelDataset(train_pixels[cut:], train_labels[cut:]),
            "test": PixelDataset(test_pixels, test_labels),
        }
