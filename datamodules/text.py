"""Causal language-modelling data: documents → tokens (cached, memory-mapped) → fixed-length blocks.

``TextDataModule`` reads the embedded standard-library corpus (default), local files or a Hugging Face
dataset (see :mod:`datamodules.text_sources`), tokenizes each split once in ``prepare_data`` into a cache
keyed by dataset, tokenizer and split (:mod:`datamodules.text_cache`), and serves batches
``{"input_ids": [B, T], "labels": [B, T]}`` with ``labels[:, t]`` the token after ``input_ids[:, t]``.

Two layouts of the token stream:

* ``blocks``: consecutive, non-overlapping windows of T tokens, shuffled (the usual packed training);
* ``streams``: the stream is cut into B·world_size contiguous streams and batch n holds segment n of each,
  so each row of a batch continues the same row of the previous batch. Validation and test always use it,
  which lets the LightningModule carry the recurrent state from one segment to the next.

The order of training batches is a pure function of (seed, epoch, rank), and the training loader's
position is saved in checkpoints, so a run resumed from a mid-epoch checkpoint continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.atomic import check_writable_folder
from datamodules.resumable import ordered_loader, replicas
from datamodules.text_cache import (
    build_token_cache,
    cache_key,
    cache_stem,
    default_cache_dir,
    open_tokens,
    read_cache_meta,
)
from datamodules.text_sources import SPLITS, HubSource, LocalFilesSource, StdlibSource
from datamodules.tokenizer import Tokenizer, build_tokenizer

LAYOUTS = ("blocks", "streams")


class _TokenWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens over a cached (memory-mapped) array."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def _window(self, start: int) -> dict[str, torch.Tensor]:
        chunk = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}  # [T], [T]


class BlockDataset(_TokenWindows):
    """Item i: tokens ``[i·T, (i+1)·T]`` as inputs and next-token labels."""

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self._window(index * self.seq_len)


class StreamDataset(_TokenWindows):
    """``num_streams`` contiguous streams of ``segments · T`` tokens; item ``n · num_streams + j`` is
    segment n of stream j, so in-order batches of ``num_streams`` rows continue every stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int, num_streams: int):
        super().__init__(tokens, seq_len)
        self.num_streams = num_streams
        self.segments = max(0, (len(tokens) - 1) // num_streams // seq_len)
        self.stream_len = self.segments * seq_len

    def __len__(self) -> int:
        return self.segments * self.num_streams

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        segment, stream = divmod(index, self.num_streams)
        return self._window(stream * self.stream_len + segment * self.seq_len)


class TextDataModule(pl.LightningDataModule):
    """Packed next-token batches from the standard library, local files or a Hugging Face dataset.

    Args:
        dataset: a Hugging Face dataset name (``"wikitext"``), or ``"stdlib"`` / None for the embedded corpus, the
            default, which ``data_files`` replaces when given (so ``--data.init_args.data_files`` works on a config
            that trains on the embedded corpus).
        dataset_config: the Hugging Face config name (``"wikitext-103-raw-v1"``).
        data_files: local files per split ``{"train": ..., "val": ..., "test": ...}``; each a file, folder,
            glob or list of them (txt/raw/tokens, jsonl, parquet).
        split_names: the Hugging Face split for each of ours (default train / validation / test; None carves
            the split out of train).
        text_field: the column or JSON field holding the text.
        txt_document: a text file's document is a ``"line"`` (fairseq's convention) or the whole ``"file"``.
        tokenizer: ``"byte"`` (257 ids: bytes and EOS) or a Hugging Face tokenizer path or name.
        seq_len: tokens per row (T).
        batch_size: rows per training batch on each device; ``eval_batch_size`` for validation and test.
        train_layout: ``"blocks"`` (shuffled windows) or ``"streams"`` (in order, for carrying state in training).
        holdout_permille: the share of documents, per mille, carved for val and for test when a source lacks them.
        cache_dir: where token caches live (default ``$HGRN2_DATA_CACHE`` or ``~/.cache/hgrn2/text``).
        num_workers: DataLoader worker processes.
        seed: seed of the training order.
    """

    def __init__(
        self,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: dict[str, str | list[str]] | None = None,
        split_names: dict[str, str | None] | None = None,
        text_field: str = "text",
        txt_document: str = "line",
        tokenizer: str = "byte",
        seq_len: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        train_layout: str = "blocks",
        holdout_permille: int = 10,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if train_layout not in LAYOUTS:
            raise ValueError(f"train_layout must be one of {LAYOUTS}, got {train_layout!r}")
        if seq_len < 1 or batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"seq_len, batch_size and eval_batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 < holdout_permille < 500:
            raise ValueError(f"holdout_permille must be in (0, 500), got {holdout_permille}")
        if data_files is not None and dataset not in (None, "stdlib"):
            raise ValueError(
                f"give either dataset ({dataset!r}) or data_files, not both; to train on local files with a config "
                "that names a Hugging Face dataset, add --data.init_args.dataset null"
            )
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_layout, self.num_workers, self.seed = train_layout, num_workers, seed
        self.cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
        if data_files is not None:
            self.source = LocalFilesSource(data_files, text_field, txt_document, holdout_permille)
            self.label = "files"
        elif dataset in (None, "stdlib"):
            self.source = StdlibSource(holdout_permille)
            self.label = "stdlib"
        else:
            self.source = HubSource(dataset, dataset_config, split_names, text_field, holdout_permille)
            self.label = f"{dataset}-{dataset_config or ''}"
        self.tokenizer_spec = tokenizer
        self._tokenizer: Tokenizer | None = None
        self.tokens: dict[str, np.ndarray] = {}
        self.meta: dict[str, dict] = {}

    # ------------------------------------------------------------------ tokenizer and caches
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def cache_location(self, split: str) -> tuple:
        """(file stem, key, description) of ``split``'s token cache."""
        description = self.source.describe(split)
        key = cache_key(description, self.tokenizer.cache_key)
        label = f"{self.label}-{self.tokenizer.name.rsplit('/', 1)[-1]}"
        return cache_stem(self.cache_dir, label, split, key), key, description

    def prepare_data(self) -> None:
        """Tokenize every split that has no complete cache yet (rank 0; runs once per cache)."""
        missing = [(split, *self.cache_location(split)) for split in SPLITS]
        missing = [m for m in missing if read_cache_meta(m[1], m[2]) is None]
        if missing:  # before tokenizing, which may take minutes
            check_writable_folder(
                self.cache_dir,
                "token cache",
                "set data.init_args.cache_dir (or $HGRN2_DATA_CACHE) to a folder you can write",
            )
        for split, stem, key, description in missing:
            build_token_cache(stem, self.source.documents(split), self.tokenizer, description, key)

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", SPLITS)
        for split in needed:
            self._open(split)

    def _open(self, split: str) -> None:
        if split not in self.tokens:
            stem, key, _ = self.cache_location(split)
            meta = read_cache_meta(stem, key)
            if meta is None:
                raise FileNotFoundError(
                    f"no token cache for split {split!r} at {stem}.bin: call prepare_data() first (Lightning does)"
                )
            if meta["num_tokens"] <= self.seq_len:
                raise ValueError(
                    f"split {split!r} has {meta['num_tokens']} tokens, too few for seq_len {self.seq_len}; "
                    "use more data, a larger holdout_permille or a shorter seq_len"
                )
            self.tokens[split], self.meta[split] = open_tokens(stem, meta), meta

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, resumable: bool = False) -> DataLoader:
        return ordered_loader(
            dataset,
            self.trainer,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=self.seed,
            resumable=resumable,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _streams(self, split: str, batch_size: int) -> StreamDataset:
        world, _ = replicas(self.trainer)
        dataset = StreamDataset(self.tokens[split], self.seq_len, batch_size * world)
        if len(dataset) == 0:
            raise ValueError(
                f"split {split!r} ({len(self.tokens[split])} tokens) cannot fill {batch_size * world} streams of "
                f"{self.seq_len} tokens; lower eval_batch_size or seq_len"
            )
        return dataset

    def train_dataloader(self) -> DataLoader:
        if self.train_layout == "streams":
            return self._loader(self._streams("train", self.batch_size), self.batch_size, False, resumable=True)
        return self._loader(BlockDataset(self.tokens["train"], self.seq_len), self.batch_size, True, resumable=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._streams("val", self.eval_batch_size), self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._streams("test", self.eval_batch_size), self.eval_batch_size, False)

    # ------------------------------------------------------------------ baselines
    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes of text per token of ``split`` (EOS counts as a token): nats/byte = nats/token / this."""
        self._open(split)
        return self.meta[split]["num_text_bytes"] / self.meta[split]["num_tokens"]

    def unigram_baseline(self, split: str = "val") -> float:
        """Cross-entropy (nats per token) of ``split`` under the add-one-smoothed token frequencies of train."""
        self._open("train")
        self._open(split)
        counts = np.bincount(self.tokens["train"], minlength=self.vocab_size).astype(np.float64) + 1.0
        log_probs = np.log(counts / counts.sum())
        targets = np.bincount(self.tokens[split][1:], minlength=self.vocab_size)
        return float(-(targets * log_probs).sum() / targets.sum())
