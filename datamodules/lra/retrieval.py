"""LRA Retrieval: do two ACL Anthology Network papers cite each other? Byte level, 4,000 bytes per paper.

Layout (``lra_release/tsv_data``)::

    data_dir/new_aan_pairs.train.tsv   new_aan_pairs.eval.tsv   new_aan_pairs.test.tsv

Each line is ``label<TAB>id1<TAB>id2<TAB>text1<TAB>text2`` with no header and no quoting; the label is
written as a float (``1.0``/``0.0``). Texts are taken as raw bytes, so token ids are byte + 1 (0 pads).
Batches carry both papers: ``input_ids``/``attention_mask`` and ``input_ids_2``/``attention_mask_2``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.lra.common import LRADataModule, PackedSequences, SequenceDataset, encode_bytes

SPLIT_FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}


def read_pairs(path: Path, max_length: int) -> SequenceDataset:
    """Read one AAN pairs file into two byte-token columns and 0/1 labels."""
    first, second, labels = [], [], []
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.rstrip(b"\r\n").split(b"\t")
            if len(fields) != 5:
                raise ValueError(
                    f"{path}:{line_number}: expected 5 tab-separated fields (label, id1, id2, text1, text2), "
                    f"got {len(fields)}"
                )
            try:
                label = int(float(fields[0]))
            except ValueError:
                raise ValueError(f"{path}:{line_number}: the label must be 0 or 1, got {fields[0][:20]!r}") from None
            if label not in (0, 1):
                raise ValueError(f"{path}:{line_number}: the label must be 0 or 1, got {label}")
            labels.append(label)
            first.append(encode_bytes(fields[3], max_length))
            second.append(encode_bytes(fields[4], max_length))
    return SequenceDataset(np.asarray(labels), PackedSequences(first), PackedSequences(second))


class RetrievalDataModule(LRADataModule):
    """AAN citation pairs as bytes (vocabulary 257 with padding); 2 classes."""

    num_classes = 2
    release_folder = "tsv_data"

    def __init__(
        self,
        data_dir: str = "data/lra/tsv_data",
        batch_size: int = 128,
        max_length: int = 4000,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(data_dir, batch_size, num_workers, seed)
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length

    def expected_files(self) -> list[Path]:
        return [self.data_dir / name for name in SPLIT_FILES.values()]

    def load_splits(self) -> dict[str, SequenceDataset]:
        return {split: read_pairs(self.data_dir / name, self.max_length) for split, name in SPLIT_FILES.items()}
