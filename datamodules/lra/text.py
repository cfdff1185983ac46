"""LRA Text: IMDB sentiment at the byte level, 2 classes, the first 4,096 bytes of each review.

The LRA code reads tensorflow-datasets' ``imdb_reviews``, which is the Stanford ``aclImdb`` release; this
module reads that release unpacked (https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz)::

    data_dir/train/pos/*.txt   data_dir/train/neg/*.txt   data_dir/test/pos/*.txt   data_dir/test/neg/*.txt

(``train/unsup`` is ignored), or, with ``hub_name`` (e.g. ``stanfordnlp/imdb``), any dataset that
``datasets.load_dataset`` opens with ``train``/``test`` splits and ``text``/``label`` columns. As in LRA the
test set doubles as the validation set unless ``val_fraction`` holds part of the training set out.
Label 1 is a positive review. Token ids are byte + 1 (0 pads).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.lra.common import LRADataModule, PackedSequences, SequenceDataset, encode_bytes, split_indices

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
CLASSES = ("neg", "pos")


def read_reviews(folder: Path, max_length: int) -> SequenceDataset:
    """Reviews of ``folder/{neg,pos}/*.txt`` in sorted file order, labelled 0 (neg) and 1 (pos)."""
    sequences, labels = [], []
    for label, name in enumerate(CLASSES):
        files = sorted((folder / name).glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no reviews (*.txt) in {folder / name}")
        for path in files:
            sequences.append(encode_bytes(path.read_bytes(), max_length))
            labels.append(label)
    return SequenceDataset(np.asarray(labels), PackedSequences(sequences))


def read_hub_split(split, max_length: int) -> SequenceDataset:
    """A ``datasets`` split with ``text`` and ``label`` columns."""
    sequences = [encode_bytes(text.encode("utf-8"), max_length) for text in split["text"]]
    return SequenceDataset(np.asarray(split["label"]), PackedSequences(sequences))


class TextDataModule(LRADataModule):
    """IMDB reviews as bytes (vocabulary 257 with padding), from ``aclImdb/`` or a ``datasets`` name."""

    num_classes = 2

    def __init__(
        self,
        data_dir: str = "data/lra/aclImdb",
        batch_size: int = 64,
        max_length: int = 4096,
        val_fraction: float = 0.0,
        hub_name: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(data_dir, batch_size, num_workers, seed)
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1) (0 validates on the test set), got {val_fraction}")
        self.max_length, self.val_fraction, self.hub_name = max_length, val_fraction, hub_name

    def expected_files(self) -> list[Path]:
        return [self.data_dir / split / name for split in ("train", "test") for name in CLASSES]

    def how_to_get(self) -> str:
        return (
            f"Download {IMDB_URL} (the IMDB release behind tensorflow-datasets' imdb_reviews, which LRA uses), "
            "unpack it and point data_dir at aclImdb/; or set hub_name (e.g. stanfordnlp/imdb) to load it with "
            "the `datasets` package."
        )

    def check_files(self) -> None:
        if self.hub_name is None:
            super().check_files()

    def load_splits(self) -> dict[str, SequenceDataset]:
        if self.hub_name is not None:
            import datasets  # optional dependency, only for hub or local `datasets` folders

            loaded = datasets.load_dataset(self.hub_name)
            train, test = (read_hub_split(loaded[name], self.max_length) for name in ("train", "test"))
        else:
            train, test = (read_reviews(self.data_dir / name, self.max_length) for name in ("train", "test"))
        if self.val_fraction == 0.0:
            return {"train": train, "val": test, "test": test}
        keep, held_out = split_indices(len(train), [1 - self.val_fraction, self.val_fraction], self.seed)
        return {"train": train.subset(keep), "val": train.subset(held_out), "test": test}
