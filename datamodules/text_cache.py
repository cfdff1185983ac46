"""The on-disk token cache: one flat, memory-mapped array of token ids per (dataset, tokenizer, split).

A cache is two files, ``<name>.bin`` (the ids, documents separated by EOS) and ``<name>.json`` (dtype,
length and what was tokenized). Both are written with :func:`datamodules.atomic.write_atomically` (a temporary
file renamed into place), the ``.json`` last, so a reader sees either a complete cache or none: an interrupted
build leaves neither a truncated cache nor a temporary file. Building shows a progress bar on a terminal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np
from tqdm import tqdm

from datamodules.atomic import write_atomically
from datamodules.tokenizer import Tokenizer

FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = "~/.cache/hgrn2/text"


def default_cache_dir() -> Path:
    """``$HGRN2_DATA_CACHE`` or ``~/.cache/hgrn2/text``."""
    return Path(os.environ.get("HGRN2_DATA_CACHE", DEFAULT_CACHE_DIR)).expanduser()


def cache_key(description: dict, tokenizer_key: str) -> str:
    """A digest of everything that decides the token ids: the source, the split and the tokenizer."""
    payload = json.dumps({"v": FORMAT_VERSION, "data": description, "tokenizer": tokenizer_key}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cache_stem(cache_dir: Path, label: str, split: str, key: str) -> Path:
    """``<cache_dir>/<label>-<split>-<key>`` with the label reduced to file-name-safe characters."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "text"
    return cache_dir / f"{safe}-{split}-{key}"


def bin_path(stem: Path) -> Path:
    return stem.with_name(stem.name + ".bin")


def meta_path(stem: Path) -> Path:
    return stem.with_name(stem.name + ".json")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def build_token_cache(
    stem: Path,
    documents: Iterable[str],
    tokenizer: Tokenizer,
    description: dict,
    key: str,
    batch_documents: int = 512,
) -> dict:
    """Tokenize ``documents`` (EOS after each) into ``stem.bin`` + ``stem.json``; returns the metadata."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype).tobytes()
    counts = {"tokens": 0, "documents": 0, "bytes": 0}

    def write_tokens(out: IO[bytes]) -> None:
        # the number of documents is unknown until the source is read: the bar counts them and shows the tokens
        with tqdm(desc=f"tokenizing {stem.name}", unit=" docs", disable=None, leave=False) as bar:
            batch: list[str] = []

            def flush() -> None:
                for text, ids in zip(batch, tokenizer.encode_batch(batch)):
                    out.write(np.asarray(ids).astype(dtype, copy=False).tobytes())
                    out.write(eos)
                    counts["tokens"] += len(ids) + 1
                    counts["bytes"] += len(text.encode("utf-8"))
                counts["documents"] += len(batch)
                bar.update(len(batch))
                bar.set_postfix(tokens=counts["tokens"], refresh=False)
                batch.clear()

            for text in documents:
                batch.append(text)
                if len(batch) == batch_documents:
                    flush()
            flush()

    write_atomically(bin_path(stem), write_tokens, binary=True, durable=True)
    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "dtype": dtype.name,
        "num_tokens": counts["tokens"],
        "num_documents": counts["documents"],
        "num_text_bytes": counts["bytes"],
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": tokenizer.name,
        "description": description,
    }
    text = json.dumps(meta, indent=1)
    write_atomically(meta_path(stem), lambda file: file.write(text), durable=True)
    return meta


def read_cache_meta(stem: Path, key: str) -> dict | None:
    """The metadata of a complete cache at ``stem`` for ``key``, or None when there is none."""
    ids, info = bin_path(stem), meta_path(stem)
    if not info.is_file() or not ids.is_file():
        return None
    try:
        meta = json.loads(info.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"token cache metadata {info} is not valid JSON ({error}): the file was truncated or changed after the "
            f"cache was written. Delete {info} and {ids} to rebuild the cache"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
        return None
    if ids.stat().st_size != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
        raise ValueError(
            f"token cache {ids} has {ids.stat().st_size} bytes but its metadata says "
            f"{meta['num_tokens']} {meta['dtype']} tokens; delete {ids} and {info} to rebuild it"
        )
    return meta


def open_tokens(stem: Path, meta: dict) -> np.ndarray:
    """The cached ids as a read-only memory map ``[num_tokens]``."""
    if meta["num_tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(bin_path(stem), dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
