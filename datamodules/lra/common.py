"""Pieces shared by the LRA datamodules: byte encoding, packed storage, batching and the base class.

Batches are dicts: ``input_ids`` ``[B, T]`` (int64 token ids, or uint8 pixel levels for the image tasks,
``[B, T, C]`` for colour), ``attention_mask`` ``[B, T]`` (bool, True on real tokens; text tasks only) and
``labels`` ``[B]`` (int64); the retrieval task adds ``input_ids_2`` and ``attention_mask_2``.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datamodules.resumable import split_loader

T, R = TypeVar("T"), TypeVar("R")

PAD_ID = 0
BYTE_VOCAB_SIZE = 257  # byte b is token b + 1; 0 is padding (tfds ByteTextEncoder, as in the LRA code)
LRA_RELEASE_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"


def map_jobs(
    function: Callable[[T], R],
    jobs: Sequence[T],
    workers: int,
    progress: str | None = None,
    sizes: Sequence[int] | None = None,
    unit: str = " jobs",
) -> list[R]:
    """``[function(job) for job in jobs]``, over up to ``workers`` spawned processes when there are several
    jobs (``function`` must then be a module-level function). The results keep the jobs' order.

    ``progress`` titles a progress bar, shown on a terminal only, that advances by ``sizes[i]`` (default 1, in
    ``unit``) as job i finishes."""
    if sizes is not None and len(sizes) != len(jobs):
        raise ValueError(f"sizes must give one size per job: {len(sizes)} sizes for {len(jobs)} jobs")
    steps = list(sizes) if sizes is not None else [1] * len(jobs)
    with tqdm(total=sum(steps), desc=progress, unit=unit, disable=None if progress else True) as bar:
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                results = []
                for result, step in zip(pool.imap(function, jobs, chunksize=1), steps):
                    results.append(result)
                    bar.update(step)
                return results
        results = []
        for job, step in zip(jobs, steps):
            results.append(function(job))
            bar.update(step)
        return results


def missing_data_error(task: str, expected: Sequence[Path], how_to_get: str) -> FileNotFoundError:
    """One error that names every expected file and says where to get them."""
    missing = [str(path) for path in expected if not Path(path).exists()]
    listing = "\n  ".join(missing or [str(path) for path in expected])
    return FileNotFoundError(f"{task} data not found; expected:\n  {listing}\n{how_to_get}")


def encode_bytes(data: bytes, max_length: int) -> np.ndarray:
    """Byte-level ids (byte + 1) of the first ``max_length`` bytes, uint16 ``[min(len, max_length)]``."""
    return np.frombuffer(data[:max_length], dtype=np.uint8).astype(np.uint16) + 1


class PackedSequences:
    """Many variable-length int sequences in one flat array plus offsets: cheap to index and, unlike a
    list of Python objects, shared between DataLoader workers without copy-on-write growth."""

    def __init__(self, sequences: Sequence[np.ndarray], dtype=np.uint16):
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        self.offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.data = np.concatenate([np.asarray(s, dtype=dtype) for s in sequences]) if sequences else np.zeros(0, dtype)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.data[self.offsets[index] : self.offsets[index + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class SequenceDataset(Dataset):
    """Token sequences (one or two per example) and integer labels."""

    def __init__(self, labels: np.ndarray, *sequences: PackedSequences):
        if any(len(s) != len(labels) for s in sequences):
            raise ValueError("every sequence column needs one entry per label")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return tuple(column[index] for column in self.sequences) + (int(self.labels[index]),)

    def subset(self, indices: np.ndarray) -> SequenceDataset:
        columns = [PackedSequences([column[i] for i in indices], column.data.dtype) for column in self.sequences]
        return SequenceDataset(self.labels[indices], *columns)


def pad_sequences(sequences: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, T] int64, mask [B, T] bool)`` right-padded with :data:`PAD_ID` to the longest sequence."""
    length = max(1, max(len(s) for s in sequences))
    ids = np.full((len(sequences), length), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


def collate_sequences(batch) -> dict[str, torch.Tensor]:
    """Batch ``(ids, label)`` or ``(ids, ids_2, label)`` examples (see the module docstring)."""
    columns = list(zip(*batch))
    out = {"labels": torch.tensor(columns[-1], dtype=torch.long)}
    for position, column in enumerate(columns[:-1]):
        suffix = "" if position == 0 else f"_{position + 1}"
        out[f"input_ids{suffix}"], out[f"attention_mask{suffix}"] = pad_sequences(column)
    return out


def collate_images(batch) -> dict[str, torch.Tensor]:
    """Batch ``(pixels uint8 [L] or [L, C], label)`` examples."""
    pixels, labels = zip(*batch)
    return {"input_ids": torch.from_numpy(np.stack(pixels)), "labels": torch.tensor(labels, dtype=torch.long)}


def split_indices(count: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """A seeded random partition of ``range(count)`` into parts of the given fractions (the last takes the
    rest); every part gets at least one index when ``count`` allows."""
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must sum to 1, got {list(fractions)}")
    order = np.random.default_rng(seed).permutation(count)
    sizes = [int(fraction * count) for fraction in fractions[:-1]]
    bounds = np.cumsum([0] + sizes + [count - sum(sizes)])
    return [order[bounds[i] : bounds[i + 1]] for i in range(len(fractions))]


class LRADataModule(pl.LightningDataModule):
    """Loaders over ``self.splits`` (``train``/``val``/``test`` datasets that :meth:`load_splits` builds).

    The training order is a function of ``seed``, epoch and rank, and its position goes into checkpoints
    (:mod:`datamodules.resumable`): a fit resumed from a mid-epoch checkpoint sees the batches an uninterrupted
    one would have seen."""

    num_classes: int = 2
    collate_fn = staticmethod(collate_sequences)

    def __init__(self, data_dir: str, batch_size: int, num_workers: int, seed: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.splits: dict[str, Dataset] = {}

    def expected_files(self) -> list[Path]:
        """The files that must exist under ``data_dir``."""
        raise NotImplementedError

    release_folder = ""  # where the task lives inside the unpacked lra_release

    def how_to_get(self) -> str:
        return (
            f"Download {LRA_RELEASE_URL}, unpack it with `tar xf lra_release.gz` and point data_dir at "
            f"lra_release/{self.release_folder}."
        )

    def load_splits(self) -> dict[str, Dataset]:
        raise NotImplementedError

    def check_files(self) -> None:
        expected = self.expected_files()
        if not all(path.exists() for path in expected):
            raise missing_data_error(type(self).__name__, expected, self.how_to_get())

    def prepare_data(self) -> None:
        self.check_files()

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.check_files()
            self.splits = self.load_splits()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            raise ValueError(f"{type(self).__name__}.setup() must run before its {split} loader is requested")
        dataset = self.splits[split]
        return split_loader(
            dataset,
            self.trainer,
            train=shuffle,
            seed=self.seed,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=type(self).collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
