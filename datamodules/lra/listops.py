"""LRA ListOps: nested MIN/MAX/MED/SUM_MOD expressions over digits, 10 classes (the value), length <= 2,000.

Layout (``lra_release/listops-1000``, or what :mod:`datamodules.lra.generate_listops` writes)::

    data_dir/basic_train.tsv   basic_val.tsv   basic_test.tsv     columns Source<TAB>Target, with a header

Tokens are the operator language: ``[MIN [MAX [MED [SM``, the closing ``]`` and the digits 0-9; the
parentheses of the official string form carry no information and are dropped. This is the S4 pipeline's
tokenisation, which the HGRN2 authors' LRA code builds on; the LRA code's own tfds tokenizer keeps only
alphanumeric runs, so it also loses the brackets that close each operator's argument list.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from datamodules.lra.common import LRADataModule, PackedSequences, SequenceDataset

VOCAB = ("<pad>", "[MIN", "[MAX", "[MED", "[SM", "]", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
TOKEN_IDS = {token: index for index, token in enumerate(VOCAB)}
VOCAB_SIZE = len(VOCAB)

# Fast path: every token becomes one character (operators are renamed to a letter), then a byte lookup.
_OPERATOR_LETTERS = {"[MIN": "a", "[MAX": "b", "[MED": "c", "[SM": "d"}
_BYTE_TO_ID = np.full(256, 255, dtype=np.uint8)
for _token, _letter in [*_OPERATOR_LETTERS.items(), ("]", "]"), *((str(d), str(d)) for d in range(10))]:
    _BYTE_TO_ID[ord(_letter)] = TOKEN_IDS[_token]
_DROP = str.maketrans("", "", "() \t")
_OPERATOR_PATTERN = re.compile("|".join(re.escape(op) for op in _OPERATOR_LETTERS))


def tokenize(source: str) -> list[str]:
    """The tokens of a ListOps source string (parentheses dropped)."""
    return source.replace("(", " ").replace(")", " ").split()


def encode(source: str, max_length: int = 2000) -> np.ndarray:
    """Token ids (uint8) of a source string, truncated to ``max_length``; unknown tokens raise ValueError."""
    compact = _OPERATOR_PATTERN.sub(lambda m: _OPERATOR_LETTERS[m.group(0)], source).translate(_DROP)
    ids = _BYTE_TO_ID[np.frombuffer(compact.encode("utf-8"), dtype=np.uint8)]
    if (ids == 255).any() or len(ids) != len(tokenize(source)):
        unknown = sorted({token for token in tokenize(source) if token not in TOKEN_IDS})
        raise ValueError(
            f"unknown ListOps token(s) {unknown[:5]} in {source[:80]!r}; the vocabulary is {list(VOCAB[1:])}"
        )
    return ids[:max_length]


def read_split(path: Path, max_length: int) -> SequenceDataset:
    """Read one ``Source``/``Target`` tsv into token ids and labels."""
    sequences, labels = [], []
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [column.strip() for column in header[:2]] != ["Source", "Target"]:
            raise ValueError(f"{path} must start with the header 'Source<TAB>Target', got {header}")
        for line_number, row in enumerate(reader, start=2):
            if len(row) < 2:
                raise ValueError(f"{path}:{line_number}: expected Source<TAB>Target, got {row}")
            try:
                label = int(row[1])
                sequences.append(encode(row[0], max_length))
            except ValueError as error:
                raise ValueError(f"{path}:{line_number}: {error}") from None
            if not 0 <= label <= 9:
                raise ValueError(f"{path}:{line_number}: Target must be a digit 0-9, got {label}")
            labels.append(label)
    return SequenceDataset(np.asarray(labels), PackedSequences(sequences, dtype=np.uint8))


class ListOpsDataModule(LRADataModule):
    """ListOps from ``{task}_{train,val,test}.tsv`` under ``data_dir``; 10 classes, vocabulary of 16."""

    num_classes = 10
    vocab_size = VOCAB_SIZE

    def __init__(
        self,
        data_dir: str = "data/lra/listops",
        batch_size: int = 128,
        max_length: int = 2000,
        task: str = "basic",
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(data_dir, batch_size, num_workers, seed)
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length, self.task = max_length, task

    def expected_files(self) -> list[Path]:
        return [self.data_dir / f"{self.task}_{split}.tsv" for split in ("train", "val", "test")]

    release_folder = "listops-1000"

    def how_to_get(self) -> str:
        generate = f"python -m datamodules.lra.generate_listops --out {self.data_dir}"
        return f"{super().how_to_get()}\nOr generate it with the LRA algorithm: {generate}"

    def load_splits(self) -> dict[str, SequenceDataset]:
        train, val, test = (read_split(path, self.max_length) for path in self.expected_files())
        return {"train": train, "val": val, "test": test}
