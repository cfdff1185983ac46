"""Tokenizers for the text datamodule: the built-in byte-level one, or any Hugging Face tokenizer.

Both expose ``vocab_size``, ``eos_id``, ``encode_batch`` (texts → token arrays), ``decode`` and a
``cache_key`` that changes whenever the token ids would.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    @property
    def cache_key(self) -> str: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOS = 256 (vocabulary of 257); nothing to download."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    @property
    def cache_key(self) -> str:
        return "byte-v1"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """Bytes back to text; EOS becomes a newline, invalid UTF-8 becomes U+FFFD."""
        out = bytearray()
        for i in np.asarray(ids).reshape(-1).tolist():
            out.extend(b"\n" if i == self.eos_id else bytes([i]) if 0 <= i < 256 else b"")
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded by local path or hub name (``transformers.AutoTokenizer``)."""

    def __init__(self, name_or_path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ValueError(f"tokenizer {name_or_path!r} needs transformers (pip install hgrn2[data])") from err
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"could not load the Hugging Face tokenizer {name_or_path!r}: no folder at "
                f"{Path(name_or_path).resolve()} and no usable copy from the Hub ({type(err).__name__}). Offline, save "
                "it once where it can be downloaded (AutoTokenizer.from_pretrained(name).save_pretrained(folder)) and "
                "pass tokenizer: <folder>, or use tokenizer: byte"
            ) from None
        self.name = name_or_path
        self.vocab_size = len(self._tokenizer)
        eos = self._tokenizer.eos_token_id
        if eos is None:
            eos = self._tokenizer.sep_token_id
        if eos is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither an EOS nor a SEP token to separate documents")
        self.eos_id = int(eos)

    @property
    def cache_key(self) -> str:
        vocab = json.dumps(sorted(self._tokenizer.get_vocab().items()), ensure_ascii=False)
        digest = hashlib.sha256(f"{type(self._tokenizer).__name__}|{self.eos_id}|{vocab}".encode()).hexdigest()
        return f"hf-{digest[:16]}"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        ids = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(row, dtype=np.int64) for row in ids]

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self._tokenizer.decode(np.asarray(ids).reshape(-1).tolist())


def build_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` → :class:`ByteTokenizer`; anything else is a Hugging Face tokenizer path or name."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
